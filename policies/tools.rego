# Tools: per-agent allow-lists and forbidden sequences for agent tool use (MCP `tools/call`).
package warden.tools

import rego.v1

cfg := data.warden.config.tools

enabled if data.warden.config.modules.tools

tool := input.request.mcp.tool

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
	tool != null
	not allowed(tool)
}

allowed(t) if {
	some p in allow_list
	glob_match(p, t)
}

allowed(_) if not allow_list

# A tool that may not follow others in the same session, e.g. secrets after a ticketing workflow.
signals contains seq.signal if {
	enabled
	tool != null
	some seq in cfg.sequences
	some then in seq.then
	glob_match(then, tool)
	some before in input.session.tools
	some after in seq.after
	glob_match(after, before)
}
