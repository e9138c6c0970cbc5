"""Evidence that holds with only the public key: a session governed through Envoy is exported
and verified offline against the log's signed checkpoint; a reformatted export still verifies,
a cut or re-signed one does not; a witness accepts a growing log and refuses one that was rolled
back or forked."""

import json
import shutil
import subprocess
import uuid

import pytest
import requests

import harness as h
from conftest import base_config, envoy_with_state

DEAD = "http://127.0.0.1:9"  # offline: nothing listens there


@pytest.fixture(scope="module")
def stack(runtime, keys, echo, tmpdir_session):
    cfg = base_config(keys, state=h.state_config())
    listeners = [h.listener("evidence", [h.wasm_filter(cfg, runtime)])]
    with envoy_with_state(tmpdir_session, "evidence", listeners, [h.cluster("echo", echo.port)]) as stack:
        yield stack


def workflow(envoy, keys, subject, n):
    sid = "ev-" + uuid.uuid4().hex[:10]
    hs = {"authorization": f"Bearer {keys.token(sub=subject)}", "x-session-id": sid}
    codes = [requests.get(envoy.url("evidence", f"/tickets/{i}"), headers=hs, timeout=5).status_code for i in range(n)]
    assert codes == [200] * n
    return sid


def cli(*args):
    return h.warden_cli(*args, url=DEAD)


def test_an_export_through_envoy_verifies_offline_with_only_the_public_key(stack, keys, tmpdir_session):
    envoy, state = stack
    sid = workflow(envoy, keys, "evidence-agent", 4)
    state.wait_complete_timeline(sid, 4)
    export = tmpdir_session / f"ev-{uuid.uuid4().hex[:6]}.jsonl"
    ex = h.warden_cli("session", "export", sid, "--out", str(export), url=state.url)
    assert ex.returncode == 0, ex.stderr
    line = json.loads(export.read_text())
    assert len(line["timeline"]) == 4 and len(line["evidence"]["leaves"]) == 4

    v = cli("session", "verify", "--file", str(export), "--key", state.vkey)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "trail intact (4 records" in v.stdout and "every record in the log" in v.stdout, v.stdout

    # Another formatter (indented, keys sorted, other escapes): the same evidence.
    pretty = tmpdir_session / "pretty.json"
    pretty.write_text(json.dumps(line, indent=2, sort_keys=True, ensure_ascii=True))
    v = cli("session", "verify", "--file", str(pretty), "--key", state.vkey)
    assert v.returncode == 0, v.stdout + v.stderr

    # The last record cut from the export, proof and all: the signed head names it.
    cut = json.loads(export.read_text())
    cut["timeline"].pop()
    cut["evidence"]["leaves"].pop()
    cut_file = tmpdir_session / "cut.jsonl"
    cut_file.write_text(json.dumps(cut) + "\n")
    v = cli("session", "verify", "--file", str(cut_file), "--key", state.vkey)
    assert v.returncode == 1 and "the last 1 record(s) are missing" in v.stdout, v.stdout

    # Verified against another log's key: the signer is unknown.
    other = tmpdir_session / f"other-{uuid.uuid4().hex[:6]}.key"
    other_vkey = subprocess.run([str(h.STATE_BIN), "keygen", "--name", h.LOG_ORIGIN, "--out", str(other)],
                                capture_output=True, text=True, check=True).stdout.strip()
    v = cli("session", "verify", "--file", str(export), "--key", other_vkey)
    assert v.returncode == 1 and "unknown keys" in v.stdout, v.stdout

    # Online, the same check against the service's own evidence.
    v = h.warden_cli("session", "verify", sid, "--key", state.vkey, url=state.url)
    assert v.returncode == 0 and "every record in the log" in v.stdout, v.stdout + v.stderr


def witness(state, state_file, *extra):
    env_token = h.LOG_TOKEN
    return h.warden_cli("log", "witness", "--state", str(state_file), "--key", state.vkey, "--log-token", env_token, *extra, url=state.url)


def consistency(state, export, out):
    return h.warden_cli("log", "consistency", "--file", str(export), "--key", state.vkey, "--log-token", h.LOG_TOKEN, "--out", str(out), url=state.url)


def test_a_witness_accepts_a_growing_log_and_refuses_a_rollback_and_a_fork(stack, keys, tmpdir_session):
    envoy, state = stack
    wkey = tmpdir_session / f"w-{uuid.uuid4().hex[:6]}.key"
    k = h.warden_cli("log", "keygen", "--name", "witness.e2e/w1", "--out", str(wkey), url=DEAD)
    assert k.returncode == 0, k.stderr
    wvkey = k.stdout.strip()
    seen = tmpdir_session / f"witness-{uuid.uuid4().hex[:6]}.checkpoint"

    first = witness(state, seen, "--cosign-key", str(wkey))
    assert first.returncode == 0 and "accepted" in first.stderr, first.stderr
    # The co-signed checkpoint verifies with the log's key and names the witness.
    assert "— witness.e2e/w1 " in first.stdout

    # Snapshot the database now (the service killed: a crash), to roll back to later.
    sid = workflow(envoy, keys, "witnessed", 3)
    state.wait_complete_timeline(sid, 3)
    state.kill()
    snapshot = tmpdir_session / "snapshot"
    snapshot.mkdir(exist_ok=True)
    for f in state.db.parent.glob(state.db.name + "*"):
        shutil.copy(f, snapshot / f.name)
    state.start()
    sid = workflow(envoy, keys, "witnessed", 2)
    state.wait_complete_timeline(sid, 2)
    assert state.admin("/v1/log/checkpoint", method="POST").status_code == 200
    grown = witness(state, seen)
    assert grown.returncode == 0 and "consistent with" in grown.stderr, grown.stderr

    # An export taken now, checked offline against a later checkpoint of the honest log.
    export = tmpdir_session / f"later-{uuid.uuid4().hex[:6]}.jsonl"
    assert h.warden_cli("session", "export", sid, "--out", str(export), url=state.url).returncode == 0
    state.wait_complete_timeline(workflow(envoy, keys, "witnessed", 2), 2)
    assert state.admin("/v1/log/checkpoint", method="POST").status_code == 200
    later = tmpdir_session / f"later-{uuid.uuid4().hex[:6]}.json"
    c = consistency(state, export, later)
    assert c.returncode == 0, c.stderr
    assert json.loads(later.read_text())["proofs"], later.read_text()
    v = cli("session", "verify", "--file", str(export), "--key", state.vkey, "--later", str(later))
    assert v.returncode == 0 and "trail intact" in v.stdout, v.stdout + v.stderr

    # Rolled back: the database file replaced by the earlier copy.
    state.kill()
    for f in state.db.parent.glob(state.db.name + "*"):
        f.unlink()
    for f in snapshot.iterdir():
        shutil.copy(f, state.db.parent / f.name)
    state.start()
    assert state.admin("/v1/log/checkpoint", method="POST").status_code == 200
    back = witness(state, seen)
    assert back.returncode == 1 and "went backwards" in back.stderr, back.stderr

    # Forked: the rolled-back log grows again with other records, past what the witness saw.
    for _ in range(2):
        sid = workflow(envoy, keys, "forker", 3)
        state.wait_complete_timeline(sid, 3)
    assert state.admin("/v1/log/checkpoint", method="POST").status_code == 200
    fork = witness(state, seen)
    assert fork.returncode == 1 and "forked" in fork.stderr, fork.stderr
    assert "REFUSED" in fork.stderr
    # The export taken before the rollback, against the forked log's checkpoint: named offline.
    forked_later = tmpdir_session / f"forked-{uuid.uuid4().hex[:6]}.json"
    assert consistency(state, export, forked_later).returncode == 0
    v = cli("session", "verify", "--file", str(export), "--key", state.vkey, "--later", str(forked_later))
    assert v.returncode == 1 and "inconsistent with the later one" in v.stdout, v.stdout + v.stderr
    # The refusals left the state at the last accepted checkpoint.
    again = witness(state, seen)
    assert again.returncode == 1
    # A witness key is not a log key: the cosigned checkpoint still needs the log's key.
    assert wvkey.startswith("witness.e2e/w1+")
