# Tools: per-agent allow-lists and forbidden sequences for agent tool use (MCP `tools/call`).
package warden.tools

import rego.v1

cfg := data.warden.config.tools

enabled if data.warden.config.modules.tools

# Every tool this request calls, by its position: a JSON-RPC batch is judged call by call,
# never by its first call alone.
calls[i] := c.tool if {
	some i, c in input.request.mcp.calls
	is_string(c.tool)
}

glob_match(pattern, name) if pattern == name

glob_match(pattern, name) if {
	endswith(pattern, "*")
	startswith(name, trim_suffix(pattern, "*"))
}

# The allow-list of this subject, else the default one ("*"); no list means no restriction.
allow_list := cfg.allow[input.identity.subject]

allow_list := cfg.allow["*"] if not cfg.allow[input.identity.subject]

signals contains "tool_not_allowed" if {
	enabled
	some tool in calls
	not allowed(tool)
}

allowed(t) if {
	some p in allow_list
	glob_match(p, t)
}

allowed(_) if not allow_list

# A tool that may not follow others in the same session, e.g. secrets after a ticketing workflow:
# earlier in the session, or earlier in the same batch.
signals contains seq.signal if {
	enabled
	some i, tool in calls
	some seq in cfg.sequences
	some then in seq.then
	glob_match(then, tool)
	some before in earlier(i)
	some after in seq.after
	glob_match(after, before)
}

earlier(i) := array.concat(input.session.tools, [t | some j, t in calls; j < i])
