# Drift: the context of a session changing under it (region, device, workload).
package warden.drift

import rego.v1

enabled if data.warden.config.modules.drift

changed(value, seen) if {
	value != null
	count(seen) > 0
	not value in seen
}

signals contains "region_changed" if {
	enabled
	changed(input.context.region, input.session.regions)
}

signals contains "device_changed" if {
	enabled
	changed(input.context.device, input.session.devices)
}

signals contains "workload_changed" if {
	enabled
	changed(input.identity.workload, input.session.workloads)
}
