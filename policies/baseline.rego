# Baselines: what is unusual for this identity across its sessions (its behavioural profile,
# `input.identity.profile`, kept by the state service), and what a session does that no single
# step shows: data extraction, fan-out across tenants, repeated refusals.
package warden.baseline

import rego.v1

cfg := data.warden.config.baseline

enabled if data.warden.config.modules.baseline

profile := input.identity.profile

# A profile speaks only once it has seen enough: before, nothing is unusual.
learned if {
	enabled
	profile.steps >= cfg.learning.min_steps
	input.now - profile.first_seen >= cfg.learning.min_seconds
}

signals contains "region_unusual" if {
	learned
	input.context.region != null
	not profile.regions[input.context.region] >= cfg.min_count
}

signals contains "tool_unusual" if {
	learned
	some c in input.request.mcp.calls
	is_string(c.tool)
	not profile.tools[c.tool] >= cfg.min_count
}

# The share of the subject's steps taken in this UTC hour.
signals contains "hour_unusual" if {
	learned
	hour := floor(input.now / 3600) % 24
	profile.hours[hour] < cfg.hour_min_share * sum(profile.hours)
}

# The tenants (hosts) this session has called, this one included, that the subject does not
# habitually call: all of them while its profile is empty.
authorities contains a if some a in input.session.authorities

authorities contains input.request.authority if is_string(input.request.authority)

signals contains "tenant_spread" if {
	enabled
	count(input.session.authorities) >= cfg.tenant_spread.max_unfamiliar
	count({a | some a in authorities; not profile.authorities[a] >= cfg.min_count}) > cfg.tenant_spread.max_unfamiliar
}

# Response bytes of the session's steps so far: over a ceiling, or far over what the subject's
# steps habitually return.
signals contains "data_volume" if {
	enabled
	input.session.bytes_out > cfg.data_volume.max_session_bytes
}

signals contains "data_volume" if {
	enabled
	input.session.bytes_out > cfg.data_volume.min_bytes
	learned
	input.session.bytes_out > (cfg.data_volume.profile_factor * profile.bytes_per_step) * input.session.step
}

# Denials and failed step-ups of this session within the window.
signals contains "refusals_repeated" if {
	enabled
	count(input.session.refusals) >= cfg.refusals.max
	count([t | some t in input.session.refusals; input.now - t <= cfg.refusals.window_seconds]) >= cfg.refusals.max
}
