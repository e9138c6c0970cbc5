# The request-flow tests' policy (and the fuzz targets'): one rule a behaviour under test.
package warden.session
import rego.v1

default decision := {"action": "allow", "reasons": [], "risk": 0}

decision := {"action": "deny", "reasons": ["path_forbidden"], "risk": 90} if startswith(input.request.path, "/admin")
decision := {"action": "step_up", "reasons": ["sensitive"], "risk": 50, "acr_values": "phr"} if input.request.path == "/secrets"
decision := {"action": "throttle", "reasons": ["slow_down"], "retry_after": 9} if input.request.path == "/busy"
decision := {"action": "terminate", "reasons": ["kill"]} if input.request.path == "/kill"
decision := {"action": "allow", "reasons": [], "headers": {"x-policy-saw": input.identity.subject}} if input.request.path == "/echo-subject"
decision := {"action": "allow", "reasons": [], "headers": {"x-delegation": concat(",", input.identity.delegation)}} if input.request.path == "/delegation"
decision := {"action": "deny", "reasons": ["state_unavailable"]} if input.session.unavailable
decision := {"action": "deny", "reasons": ["tool_forbidden"]} if input.request.mcp.tool == "shell.exec"
decision := {"action": "deny", "reasons": ["client_forbidden"]} if input.request.mcp.client.name == "old-agent"
decision := {"action": "allow", "reasons": [], "risk": input.session.risk + 10, "flags": ["risky"]} if input.request.path == "/risky"
decision := {"action": "allow", "reasons": [], "step_up_satisfied": true} if input.request.path == "/strong"
decision := {"action": "allow", "reasons": [], "headers": {"x-last-step-up": sprintf("%v", [input.session.last_step_up])}} if input.request.path == "/check-step-up"
