# Limits: how long, how idle, how many steps, how fast, and when a session may run.
package warden.limits

import rego.v1

cfg := data.warden.config.limits

enabled if data.warden.config.modules.limits

privileged if {
	some s in input.identity.scopes
	s in cfg.privileged_scopes
}

sensitive_touched if {
	some t in input.session.tools
	some p in cfg.sensitive_tools
	glob_match(p, t)
}

# The shortest limit that applies: privileged sessions, and delegated sessions that touched
# sensitive tools, get less time.
ages contains cfg.max_session_seconds

ages contains cfg.privileged_max_session_seconds if privileged

ages contains cfg.delegated_sensitive_max_session_seconds if {
	count(input.identity.delegation) > 0
	sensitive_touched
}

max_age := min(ages)

signals contains "session_too_long" if {
	enabled
	not input.session.new
	# Younger than every configured limit (a missing one never applies: 2^53 - 1 s): skip
	# working out which limit is this session's.
	input.now - input.session.started_at > min([
		object.get(cfg, "max_session_seconds", 9007199254740991),
		object.get(cfg, "privileged_max_session_seconds", 9007199254740991),
		object.get(cfg, "delegated_sensitive_max_session_seconds", 9007199254740991),
	])
	input.now - input.session.started_at > max_age
}

signals contains "session_idle" if {
	enabled
	not input.session.new
	input.now - input.session.last_seen_at > cfg.idle_timeout_seconds
}

signals contains "too_many_steps" if {
	enabled
	input.session.step > cfg.max_steps
}

signals contains "step_rate_exceeded" if {
	enabled
	input.session.steps >= cfg.rate_burst
	elapsed := max([1, input.now - input.session.started_at])
	(input.session.steps * 60) / elapsed > cfg.max_steps_per_minute
}

# Automation that runs outside its schedule (UTC hours, [from, to)).
signals contains "outside_schedule" if {
	enabled
	some subject, window in cfg.schedules
	subject == input.identity.subject
	hour := floor((input.now % 86400) / 3600)
	not in_window(hour, window)
}

in_window(h, w) if {
	w[0] <= w[1]
	h >= w[0]
	h < w[1]
}

in_window(h, w) if {
	w[0] > w[1]
	h >= w[0]
}

in_window(h, w) if {
	w[0] > w[1]
	h < w[1]
}

# `prefix*` or an exact name.
glob_match(pattern, name) if pattern == name

glob_match(pattern, name) if {
	endswith(pattern, "*")
	startswith(name, trim_suffix(pattern, "*"))
}
