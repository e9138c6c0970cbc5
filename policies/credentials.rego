# Credentials: rotation, sharing, expiry and scope escalation inside a session, and
# sender-constrained tokens presented without their key.
package warden.credentials

import rego.v1

cfg := data.warden.config.credentials

enabled if data.warden.config.modules.credentials

fingerprint := input.credential.fingerprint

# Rotation by the session's own subject is allowed; it is a signal so it is weighed and recorded.
signals contains "credential_rotated" if {
	enabled
	fingerprint != null
	count(input.session.credentials) > 0
	not fingerprint in input.session.credentials
}

# The same credential presented by another subject, in any session.
signals contains "credential_shared" if {
	enabled
	some other in input.session.credential_subjects
	other != input.identity.subject
}

signals contains "credential_expiring" if {
	enabled
	is_number(input.credential.exp)
	input.credential.exp - input.now < cfg.expiring_seconds
}

# Scopes wider than the session started with.
signals contains "scope_escalation" if {
	enabled
	not input.session.new
	count(input.session.scopes) > 0
	some s in input.identity.scopes
	not s in input.session.scopes
}

# A sender-constrained token (RFC 8705 mTLS-bound, RFC 9449 DPoP-bound) presented without
# proof of its certificate or key: a copied token, used from elsewhere. (A DPoP proof that is
# present but wrong never gets here: the filter refuses it, 401 `dpop_*`.)
signals contains "token_binding_unproven" if {
	enabled
	input.identity.binding.kind != null
	not input.identity.binding.held
}
