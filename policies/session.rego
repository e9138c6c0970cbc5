# The default session policy. Everything it enforces is data: see data.json and the README.
package warden.session

import rego.v1

cfg := data.warden.config

# A step-up is satisfied by a token whose `acr` is one of the configured strong values.
stepped_up if input.identity.claims.acr in cfg.step_up.acr_values

path_matches(prefixes) if {
	some p in prefixes
	startswith(input.request.path, p)
}

# Fail closed when the session state is unknown, unless the data allows degraded operation.
deny contains "session_state_unavailable" if {
	input.session.unavailable
	not cfg.allow_degraded
}

deny contains "path_forbidden" if path_matches(cfg.forbidden_paths)

deny contains "scope_missing" if {
	some rule in cfg.scoped_paths
	startswith(input.request.path, rule.prefix)
	not rule.scope in input.identity.scopes
}

deny contains "delegation_too_deep" if count(input.identity.delegation) > cfg.max_delegation_depth

step_up contains "sensitive_path" if {
	path_matches(cfg.step_up.paths)
	not stepped_up
}

terminate contains "session_too_long" if {
	not input.session.new
	input.now - input.session.started_at > cfg.max_session_seconds
}

throttle contains "too_many_steps" if input.session.step > cfg.max_steps

# The most severe action wins; its reasons are reported, sorted for stable output.
decision := {"action": "terminate", "reasons": sort(terminate), "risk": 100} if {
	count(terminate) > 0
} else := {"action": "deny", "reasons": sort(deny), "risk": 80} if {
	count(deny) > 0
} else := {"action": "step_up", "reasons": sort(step_up), "risk": 50, "acr_values": concat(" ", cfg.step_up.acr_values)} if {
	count(step_up) > 0
} else := {"action": "throttle", "reasons": sort(throttle), "risk": 40, "retry_after": cfg.throttle_retry_after} if {
	count(throttle) > 0
} else := {"action": "allow", "reasons": [], "risk": 0}
