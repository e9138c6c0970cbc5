# Drift: the context of a session changing under it (region, device, workload).
package warden.drift

import rego.v1

enabled if data.warden.config.modules.drift

# Each check is written out rather than shared through a function: a function call is the
# costliest thing the RVM does, and these run on every request.

signals contains "region_changed" if {
	enabled
	input.context.region != null
	count(input.session.regions) > 0
	not input.context.region in input.session.regions
}

signals contains "device_changed" if {
	enabled
	input.context.device != null
	count(input.session.devices) > 0
	not input.context.device in input.session.devices
}

signals contains "workload_changed" if {
	enabled
	input.identity.workload != null
	count(input.session.workloads) > 0
	not input.identity.workload in input.session.workloads
}
