# The session policy: every module below emits signals; data says what each signal does.
#   data.warden.config.modules   which modules run
#   data.warden.config.actions   signal -> deny | step_up | throttle | terminate (else: risk only)
#   data.warden.config.risk      weights, decay and thresholds
#   data.warden.config.flags     signals that flag the session for review
package warden.session

import rego.v1

cfg := data.warden.config

# Request rules that are not a module of their own.
base contains "session_state_unavailable" if {
	input.session.unavailable
	not cfg.allow_degraded
}

base contains "path_forbidden" if {
	some p in cfg.forbidden_paths
	startswith(input.request.path, p)
}

base contains "scope_missing" if {
	some rule in cfg.scoped_paths
	startswith(input.request.path, rule.prefix)
	not rule.scope in input.identity.scopes
}

base contains "delegation_too_deep" if count(input.identity.delegation) > cfg.max_delegation_depth

base contains "sensitive_path" if {
	some p in cfg.step_up.paths
	startswith(input.request.path, p)
}

signals := (((((base | data.warden.limits.signals) | data.warden.drift.signals) | data.warden.credentials.signals) | data.warden.tools.signals) | data.warden.baseline.signals)

acting(action) := {s | some s in signals; cfg.actions[s] == action}

# Step-up: a stronger credential now (high acr, fresh auth_time, a step-up issuer) satisfies it,
# and keeps it satisfied for the session for step_up.valid_seconds.
presented if input.identity.claims.acr in cfg.step_up.acr_values

# is_number guards: a missing or null time is "not satisfied" on the RVM and the interpreter alike.
# An auth_time in the future (beyond the clock skew tolerated) proves nothing: refused.
presented if {
	is_number(input.identity.claims.auth_time)
	input.now - input.identity.claims.auth_time <= cfg.step_up.max_age_seconds
	input.identity.claims.auth_time - input.now <= cfg.step_up.clock_skew_seconds
}

presented if input.identity.issuer in cfg.step_up.issuers

recently_stepped_up if {
	is_number(input.session.last_step_up)
	input.now - input.session.last_step_up <= cfg.step_up.valid_seconds
}

satisfied if presented

satisfied if recently_stepped_up

terminate := acting("terminate") | data.warden.risk.terminate

deny := acting("deny")

throttle := acting("throttle") | data.warden.risk.throttle

step_up := acting("step_up") | data.warden.risk.step_up if not satisfied

step_up := set() if satisfied

flags := sort({s | some s in signals; s in cfg.flags})

common := {
	"risk": data.warden.risk.score,
	"signals": sort(signals),
	"flags": flags,
	"step_up_satisfied": stepped_up_now,
}

stepped_up_now := true if presented

stepped_up_now := false if not presented

# The most severe action wins (terminate > deny > throttle > step_up, the order of the risk
# thresholds); its reasons are reported, sorted for stable output.
# The common case first: no signal and a quiet risk score allow without composing the rest.
decision := {
	"action": "allow",
	"reasons": [],
	"risk": data.warden.risk.score,
	"signals": [],
	"flags": [],
	"step_up_satisfied": stepped_up_now,
} if {
	count(signals) == 0
	not data.warden.risk.acting
} else := object.union(common, {"action": "terminate", "reasons": sort(terminate)}) if {
	count(terminate) > 0
} else := object.union(common, {"action": "deny", "reasons": sort(deny)}) if {
	count(deny) > 0
} else := object.union(common, {"action": "throttle", "reasons": sort(throttle), "retry_after": cfg.throttle_retry_after}) if {
	count(throttle) > 0
} else := object.union(common, {"action": "step_up", "reasons": sort(step_up), "acr_values": concat(" ", cfg.step_up.acr_values)}) if {
	count(step_up) > 0
} else := object.union(common, {"action": "allow", "reasons": []})
