"""Safe roll-out: a candidate policy in shadow beside the enforced one, then replay of recorded
sessions against a changed policy, export and offline verification."""

import json
import shutil
import uuid

import pytest
import requests

import harness as h
from conftest import base_config, envoy_with_state


def candidate_dir(tmp, forbid: list[str]) -> str:
    """A copy of the policy library with more forbidden paths: the change under review."""
    d = tmp / f"candidate-{uuid.uuid4().hex[:6]}"
    shutil.copytree(h.ROOT / "policies", d, ignore=shutil.ignore_patterns("cases"))
    data = json.loads((d / "data.json").read_text())
    data["warden"]["config"]["forbidden_paths"] += forbid
    (d / "data.json").write_text(json.dumps(data))
    return str(d)


@pytest.fixture(scope="module")
def stack(runtime, keys, echo, tmpdir_session):
    library = h.policy_library()
    candidate = h.deep_merge(library, {"data": {"warden": {"config": {"forbidden_paths": ["/admin", "/reports"]}}}})
    cfg = base_config(keys, state=h.state_config())
    cfg["policy"]["candidate"] = {"modules": candidate["modules"], "data": candidate["data"]}
    listeners = [h.listener("shadowed", [h.wasm_filter(cfg, runtime)])]
    with envoy_with_state(tmpdir_session, "rollout", listeners, [h.cluster("echo", echo.port)]) as stack:
        yield stack


def workflow(envoy, keys, subject, paths):
    sid = "ro-" + uuid.uuid4().hex[:10]
    hs = {"authorization": f"Bearer {keys.token(sub=subject)}", "x-session-id": sid}
    codes = [requests.get(envoy.url("shadowed", p), headers=hs, timeout=5).status_code for p in paths]
    return sid, codes


def test_a_candidate_policy_in_shadow_never_acts_but_disagreements_are_counted_and_recorded(stack, keys):
    envoy, state = stack
    before = envoy.stats().get("wasmcustom.warden.candidate.disagreements", 0)
    sid, codes = workflow(envoy, keys, "analyst", ["/tickets", "/reports/q3", "/tickets/2"])
    assert codes == [200, 200, 200], "only the enforced policy acts"
    assert envoy.stats()["wasmcustom.warden.candidate.disagreements"] == before + 1
    view = state.wait_timeline(sid, 3)
    cands = {e["record"]["step"]: e["record"]["candidate"] for e in view["timeline"]}
    assert cands[2]["disagrees"] and cands[2]["action"] == "deny" and cands[2]["reasons"] == ["path_forbidden"]
    assert not cands[1]["disagrees"] and not cands[3]["disagrees"]


def test_replay_changes_exactly_the_expected_steps(stack, keys, tmpdir_session):
    envoy, state = stack
    sid_a, _ = workflow(envoy, keys, "replay-a", ["/tickets", "/exports/1", "/tickets", "/exports/2"])
    sid_b, _ = workflow(envoy, keys, "replay-b", ["/tickets", "/tickets/9"])
    state.wait_timeline(sid_a, 4)
    state.wait_timeline(sid_b, 2)
    cand = candidate_dir(tmpdir_session, ["/exports"])

    out = h.warden_cli("replay", "--policy", cand, "--session", sid_a, "--session", sid_b, "--fail-on-change", url=state.url)
    assert out.returncode == 1, out.stdout + out.stderr
    changed = [l for l in out.stdout.splitlines() if l.startswith("CHANGED")]
    assert len(changed) == 2, out.stdout
    assert all(sid_a in l and "allow" in l and "deny" in l and "/exports/" in l for l in changed)
    assert " step   2 " in changed[0] and " step   4 " in changed[1]
    assert "2 step(s) changed, 0 skipped" in out.stdout

    # The unchanged policy changes nothing: exit 0 even with --fail-on-change.
    same = h.warden_cli("replay", "--policy", str(h.ROOT / "policies"), "--session", sid_b, "--fail-on-change", url=state.url)
    assert same.returncode == 0 and "0 step(s) changed" in same.stdout, same.stdout

    # Export, then replay and verify offline from the file alone.
    export = tmpdir_session / f"export-{uuid.uuid4().hex[:6]}.jsonl"
    ex = h.warden_cli("session", "export", sid_a, sid_b, "--out", str(export), url=state.url)
    assert ex.returncode == 0, ex.stderr
    assert len(export.read_text().splitlines()) == 2
    offline = h.warden_cli("replay", "--policy", cand, "--file", str(export), "--json", url="http://127.0.0.1:9")
    report = json.loads(offline.stdout)
    assert [(c["session_id"], c["step"]) for c in report["changes"]] == [(sid_a, 2), (sid_a, 4)]
    v = h.warden_cli("session", "verify", "--file", str(export), url="http://127.0.0.1:9")
    assert v.returncode == 0 and v.stdout.count("trail intact") == 2, v.stdout
    # An export edited after the fact fails offline verification.
    export.write_text(export.read_text().replace("/exports/2", "/exports/X", 1))
    v = h.warden_cli("session", "verify", "--file", str(export), url="http://127.0.0.1:9")
    assert v.returncode == 1 and "TRAIL BROKEN" in v.stdout


def test_the_recorded_policy_version_is_the_one_the_cli_gives_the_same_policy(stack, keys, tmpdir_session):
    envoy, state = stack
    sid, _ = workflow(envoy, keys, "versioned", ["/tickets"])
    recorded = state.wait_timeline(sid, 1)["timeline"][0]["record"]["policy_version"]
    # The enforced policy as a directory, under another path and other file names.
    policy = base_config(keys)["policy"]
    d = tmpdir_session / f"same-policy-{uuid.uuid4().hex[:6]}" / "nested"
    d.mkdir(parents=True)
    for i, (name, text) in enumerate(sorted(policy["modules"].items())):
        (d / f"{i:02d}-{name}").write_text(text)
    (d / "data.json").write_text(json.dumps(policy["data"], indent=4))
    out = h.warden_cli("policy", "check", str(d) + "/./", url="http://127.0.0.1:9")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"version {recorded}" in out.stdout, (recorded, out.stdout)
