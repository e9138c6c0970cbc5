# Risk: a session score from weighted signals, decaying over time; thresholds act on it.
package warden.risk

import rego.v1

cfg := data.warden.config.risk

enabled if data.warden.config.modules.risk

weight(s) := cfg.weights[s]

weight(s) := cfg.default_weight if not cfg.weights[s]

added := sum([weight(s) | some s in data.warden.session.signals])

# Linear decay since the last step (Rego has no exponentials): points per minute.
decayed := max([0, input.session.risk - (cfg.decay_per_minute * max([0, input.now - input.session.last_seen_at])) / 60])

score := min([100, decayed + added]) if enabled

score := 0 if not enabled

terminate contains "risk_critical" if {
	enabled
	score >= cfg.thresholds.terminate
}

throttle contains "risk_elevated" if {
	enabled
	score >= cfg.thresholds.throttle
}

step_up contains "risk_high" if {
	enabled
	score >= cfg.thresholds.step_up
}

# Some threshold is reached (the fast path of the decision checks this once).
acting if {
	enabled
	score >= min([cfg.thresholds.terminate, cfg.thresholds.throttle, cfg.thresholds.step_up])
}
