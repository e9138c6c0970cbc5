-- The one request every variant of `make bench` receives, byte for byte, and optional pacing.
-- Set by bench/run.py through the environment:
--   BENCH_PATH, BENCH_AUTH (the Authorization value), BENCH_SESSION (x-session-id)
--   BENCH_RATE      requests per second for this wrk thread; 0 or unset = as fast as possible
--   BENCH_REQ_DUMP  file to write the exact request bytes to (to compare variants)
-- At the end one line `BENCH_RESULT {json}` reports counts, errors and latency percentiles (µs).

wrk.method = "GET"
wrk.path = os.getenv("BENCH_PATH") or "/"
wrk.headers["Host"] = "api.bench.test" -- fixed, so the port of each variant's listener is not in the bytes
wrk.headers["Authorization"] = os.getenv("BENCH_AUTH")
wrk.headers["x-session-id"] = os.getenv("BENCH_SESSION")
wrk.headers["User-Agent"] = "warden-bench/1"
wrk.headers["Accept"] = "*/*"

-- Lua's table order is not stable from one wrk process to the next: format the request with
-- the headers in a fixed order so every variant receives the same bytes.
local header_order = {"Host", "User-Agent", "Accept", "Authorization", "x-session-id"}
wrk.format = function(method, path, headers, body)
  local lines = {(method or wrk.method) .. " " .. (path or wrk.path) .. " HTTP/1.1"}
  for _, name in ipairs(header_order) do
    lines[#lines + 1] = name .. ": " .. (headers or wrk.headers)[name]
  end
  return table.concat(lines, "\r\n") .. "\r\n\r\n"
end

function init(args)
  local dump = os.getenv("BENCH_REQ_DUMP")
  if dump and dump ~= "" then
    local f = io.open(dump, "wb")
    f:write(wrk.format())
    f:close()
  end
end

-- Pacing with wrk's delay(): every request takes the next slot of a fixed schedule
-- (1/rate apart) and waits until that slot's time; the clock is CLOCK_MONOTONIC through
-- LuaJIT's ffi. wrk's timers have millisecond resolution, so a request is sent at most
-- 0.5 ms early or late, but slots never drift: the average rate is the one asked for. When
-- the server cannot keep up, slots more than 50 ms late are dropped rather than sent in a
-- burst (the achieved rate is then lower, and run.py reports it).
local rate = tonumber(os.getenv("BENCH_RATE") or "0") or 0
if rate > 0 then
  local ffi = require("ffi")
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
  ]]
  local ts = ffi.new("bench_timespec")
  local function now_ms()
    ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local interval = 1000 / rate
  local next_at = nil
  function delay()
    local now = now_ms()
    if next_at == nil or next_at < now - 50 then
      next_at = now
    end
    local wait = next_at - now
    next_at = next_at + interval
    return math.floor(wait + 0.5)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "status_errors": %d, ' ..
    '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d, ' ..
    '"lat_mean_us": %.1f, "lat_p50_us": %d, "lat_p90_us": %d, "lat_p99_us": %d, ' ..
    '"lat_p999_us": %d, "lat_max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write,
    e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max))
end
