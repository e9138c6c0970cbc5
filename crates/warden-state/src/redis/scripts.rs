//! The Lua scripts: each is only an atomic compare-and-swap or an idempotent insert over keys of
//! one hash slot. No domain rule lives here: what a session becomes (binding, step numbers,
//! chain hashes, what a record adds), the log's tree hashes and what is refused are computed
//! in Rust by warden-core and warden-log, and a script writes the result only if what it was
//! computed from is unchanged. Scripts run by EVALSHA (redis-rs loads them on NOSCRIPT).

use std::sync::LazyLock;

use redis::Script;

/// Write a session (its hash, records, dedupe index and audit events; all `{s:<id>}`) only if
/// its version is still `ARGV[1]`; bump the version. Returns {new version, {}}, or {0, the
/// session's fields as they are} when it changed since it was read (the caller recomputes from
/// them: a lost race costs no extra read).
///
/// KEYS: session hash, records list, dedupe hash, audit list.
/// ARGV: expected version, then four length-prefixed groups: hash field/value pairs, records to
/// append, dedupe field/value pairs, audit events to append.
pub static SESSION_CAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ver = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0')
if ver ~= tonumber(ARGV[1]) then
  return {0, redis.call('HMGET', KEYS[1], 'ver', 'state', 'records', 'head', 'revoked_at_ms', 'revoke_reason', 'fed')}
end
local i = 2
local n = tonumber(ARGV[i]); i = i + 1
if n > 0 then
  redis.call('HSET', KEYS[1], 'ver', ver + 1, unpack(ARGV, i, i + 2 * n - 1)); i = i + 2 * n
else
  redis.call('HSET', KEYS[1], 'ver', ver + 1)
end
n = tonumber(ARGV[i]); i = i + 1
if n > 0 then redis.call('RPUSH', KEYS[2], unpack(ARGV, i, i + n - 1)); i = i + n end
n = tonumber(ARGV[i]); i = i + 1
if n > 0 then redis.call('HSET', KEYS[3], unpack(ARGV, i, i + 2 * n - 1)); i = i + 2 * n end
n = tonumber(ARGV[i]); i = i + 1
if n > 0 then redis.call('RPUSH', KEYS[4], unpack(ARGV, i, i + n - 1)) end
return {ver + 1, {}}
",
    )
});

/// Read a session's hash fields and which of the given records it holds, at one instant.
/// KEYS: session hash, dedupe hash. ARGV: dedupe fields. Returns {session fields, seqs}.
pub static SESSION_READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local s = redis.call('HMGET', KEYS[1], 'ver', 'state', 'records', 'head', 'revoked_at_ms', 'revoke_reason', 'fed')
if #ARGV == 0 then return {s, {}} end
return {s, redis.call('HMGET', KEYS[2], unpack(ARGV))}
",
    )
});

/// Extend the log by leaves computed (with their stored tree hashes) from a log of
/// `ARGV[1]` leaves in epoch `ARGV[2]`: only if the log still has that size and epoch and none
/// of the leaves is in it yet. Returns {new size, size, epoch} or {-1, size, epoch} when the log
/// moved on, {-2, size, epoch} when a leaf is already in it (another replica entered it).
///
/// KEYS: meta, leaves, hashes, index, then the session sorted set of each group of leaves.
/// ARGV: size, epoch, a new epoch (used when the log is created), the number of leaves k, their
/// k index fields, their k leaf data, the number of groups, per group (its leaf count, then per
/// leaf its seq), the number of stored hashes, (index, hash) pairs. Leaves are in log order and
/// each group is a run of consecutive leaves of one session.
pub static LOG_APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local m = redis.call('HMGET', KEYS[1], 'size', 'epoch')
local size = tonumber(m[1] or '0')
local epoch = m[2] or ''
if size ~= tonumber(ARGV[1]) or epoch ~= ARGV[2] then return {-1, size, epoch} end
local k = tonumber(ARGV[4])
local fields = 5
local data = 5 + k
local present = redis.call('HMGET', KEYS[4], unpack(ARGV, fields, fields + k - 1))
for j = 1, k do
  if present[j] then return {-2, size, epoch} end
end
local leaves, index = {}, {}
for j = 1, k do
  leaves[2 * j - 1] = size + j - 1
  leaves[2 * j] = ARGV[data + j - 1]
  index[2 * j - 1] = ARGV[fields + j - 1]
  index[2 * j] = size + j - 1
end
redis.call('HSET', KEYS[2], unpack(leaves))
redis.call('HSET', KEYS[4], unpack(index))
local p = 5 + 2 * k
local groups = tonumber(ARGV[p]); p = p + 1
local idx = size
for g = 1, groups do
  local n = tonumber(ARGV[p]); p = p + 1
  local z = {}
  for j = 1, n do
    z[2 * j - 1] = ARGV[p + j - 1]
    z[2 * j] = idx
    idx = idx + 1
  end
  p = p + n
  redis.call('ZADD', KEYS[4 + g], unpack(z))
end
local n = tonumber(ARGV[p]); p = p + 1
if n > 0 then redis.call('HSET', KEYS[3], unpack(ARGV, p, p + 2 * n - 1)) end
if epoch == '' then epoch = ARGV[3] end
redis.call('HSET', KEYS[1], 'size', size + k, 'epoch', epoch)
return {size + k, size + k, epoch}
",
    )
});

/// Enter a session's revocation into the feed once: its cursor, new or the one it already has.
/// KEYS: counter, cursors, entries, by-session. ARGV: session id, entry JSON.
pub static FEED_APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local c = redis.call('HGET', KEYS[4], ARGV[1])
if c then return tonumber(c) end
c = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], c, c)
redis.call('HSET', KEYS[3], c, ARGV[2])
redis.call('HSET', KEYS[4], ARGV[1], c)
return c
",
    )
});

/// Keep a signed checkpoint; the latest is the largest. KEYS: meta, checkpoints. ARGV: size, JSON.
pub static CHECKPOINT_STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local latest = tonumber(redis.call('HGET', KEYS[1], 'checkpoint') or '-1')
if tonumber(ARGV[1]) > latest then redis.call('HSET', KEYS[1], 'checkpoint', ARGV[1]) end
return 1
",
    )
});

/// A session as one consistent read: {hash fields, records, audit events}.
/// KEYS: session hash, records list, audit list.
pub static SESSION_VIEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local s = redis.call('HMGET', KEYS[1], 'ver', 'state', 'records', 'head', 'revoked_at_ms', 'revoke_reason', 'fed')
return {s, redis.call('LRANGE', KEYS[2], 0, -1), redis.call('LRANGE', KEYS[3], 0, -1)}
",
    )
});

/// Write a subject's profile only if its version is still `ARGV[1]`. KEYS: the profile hash.
/// ARGV: version, profile JSON. Returns {new version, {}}, or {0, {profile, version}} as they
/// are when another write came first (the caller recomputes from them).
pub static PROFILE_CAS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ver = tonumber(redis.call('HGET', KEYS[1], 'ver') or '0')
if ver ~= tonumber(ARGV[1]) then return {0, redis.call('HMGET', KEYS[1], 'p', 'ver')} end
redis.call('HSET', KEYS[1], 'p', ARGV[2], 'ver', ver + 1)
return {ver + 1, {}}
",
    )
});
