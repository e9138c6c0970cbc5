use std::cell::RefCell;
use std::collections::HashMap;

use super::*;

/// Hash storage in memory, as the service keeps it in SQLite.
#[derive(Default)]
struct Mem(RefCell<HashMap<u64, Hash>>);

impl HashReader for Mem {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        let m = self.0.borrow();
        indexes.iter().map(|i| m.get(i).copied().ok_or(tlog_tiles::Error::IndexesNotInTree)).collect()
    }
}

impl Mem {
    fn append(&self, n: u64, leaf: Hash) {
        let new = hashes_to_store(n, leaf, self).unwrap();
        self.0.borrow_mut().extend(new);
    }

    fn of(leaves: &[Hash]) -> Self {
        let m = Mem::default();
        for (i, l) in leaves.iter().enumerate() {
            m.append(i as u64, *l);
        }
        m
    }
}

fn hex(h: &Hash) -> String {
    warden_core::hash::hex(&h.0)
}

/// RFC 6962 section 2.1 written out, independently of tlog_tiles: MTH over the leaf hashes.
fn reference_root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => EMPTY_HASH,
        1 => leaves[0],
        n => {
            // The largest power of two smaller than n.
            let mut k = 1;
            while k * 2 < n {
                k *= 2;
            }
            tlog_tiles::node_hash(reference_root(&leaves[..k]), reference_root(&leaves[k..]))
        }
    }
}

/// The test inputs of the Certificate Transparency reference implementation (merkle_tree_test).
fn ct_leaves() -> Vec<Hash> {
    let inputs: [&[u8]; 8] = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ];
    inputs.iter().map(|d| tlog_tiles::record_hash(d)).collect()
}

#[test]
fn roots_match_the_rfc6962_test_vectors() {
    let want = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    let leaves = ct_leaves();
    let mem = Mem::of(&leaves);
    for (i, w) in want.iter().enumerate() {
        assert_eq!(hex(&root(i as u64 + 1, &mem).unwrap()), *w, "size {}", i + 1);
        assert_eq!(hex(&reference_root(&leaves[..=i])), *w, "reference, size {}", i + 1);
    }
    assert_eq!(hex(&root(0, &mem).unwrap()), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

fn leaves(n: u64) -> Vec<Hash> {
    (0..n).map(|i| leaf_hash(&format!("s{}", i % 7), i / 7 + 1, &format!("{i:064x}"))).collect()
}

#[test]
fn inclusion_proofs_verify_for_every_leaf_of_many_tree_sizes_and_fail_when_anything_changes() {
    let all = leaves(70);
    let mem = Mem::of(&all);
    for size in 1..=70u64 {
        let r = root(size, &mem).unwrap();
        assert_eq!(r, reference_root(&all[..size as usize]), "size {size}");
        for index in 0..size {
            let proof = prove_inclusion(index, size, &mem).unwrap();
            check_inclusion(&proof, index, size, all[index as usize], r).unwrap();
            // Another leaf, another index, another root: each refused.
            let other = all[((index + 1) % size) as usize];
            if size > 1 {
                assert!(check_inclusion(&proof, index, size, other, r).is_err());
                assert!(check_inclusion(&proof, (index + 1) % size, size, all[index as usize], r).is_err());
            }
            assert!(check_inclusion(&proof, index, size, all[index as usize], all[0]).is_err() || size == 1);
        }
    }
    assert!(prove_inclusion(5, 5, &mem).is_err());
    assert!(check_inclusion(&[], 5, 5, all[0], all[0]).is_err());
}

#[test]
fn consistency_proofs_verify_between_many_sizes_and_name_forks_and_rollbacks() {
    let all = leaves(40);
    let mem = Mem::of(&all);
    for to in 0..=40u64 {
        let to_root = root(to, &mem).unwrap();
        for from in 0..=to {
            let from_root = root(from, &mem).unwrap();
            let proof = prove_consistency(from, to, &mem).unwrap();
            check_consistency(&proof, from, from_root, to, to_root).unwrap();
            if from > 0 && from < to {
                // A log whose first `from` leaves differ (a fork or a rewrite) is refused.
                let mut forked = all[..to as usize].to_vec();
                forked[(from - 1) as usize] = leaf_hash("forged", 1, "00");
                let forked_root = reference_root(&forked);
                let e = check_consistency(&proof, from, from_root, to, forked_root).unwrap_err();
                assert!(e.0.contains("forked or was rewritten"), "{e}");
            }
        }
    }
    let (r5, r6) = (root(5, &mem).unwrap(), root(6, &mem).unwrap());
    assert!(check_consistency(&[], 6, r6, 5, r5).unwrap_err().0.contains("went backwards"));
    assert!(check_consistency(&[], 5, r5, 5, r6).unwrap_err().0.contains("forked"));
}

#[test]
fn a_leaf_commits_to_session_sequence_and_chain_hash() {
    assert_eq!(leaf_data("ses-1", 3, "ab"), r#"{"hash":"ab","seq":3,"session_id":"ses-1"}"#);
    let l = leaf_hash("ses-1", 3, "ab");
    assert_ne!(l, leaf_hash("ses-2", 3, "ab"));
    assert_ne!(l, leaf_hash("ses-1", 4, "ab"));
    assert_ne!(l, leaf_hash("ses-1", 3, "ac"));
    // RFC 6962's leaf prefix: SHA-256(0x00 || data).
    let mut data = vec![0u8];
    data.extend_from_slice(leaf_data("ses-1", 3, "ab").as_bytes());
    assert_eq!(l.0, warden_core::hash::sha256(&data));
}

fn signer(name: &str) -> (LogSigner, String) {
    let (skey, vkey) = generate_log_key(name).unwrap();
    (LogSigner::from_keys(&[skey]).unwrap(), vkey)
}

#[test]
fn checkpoints_are_c2sp_notes_that_verify_with_the_key_and_only_with_it() {
    let (log, vkey) = signer("warden.example/log");
    assert_eq!(log.verifier_keys(), std::slice::from_ref(&vkey));
    let mem = Mem::of(&leaves(9));
    let r = root(9, &mem).unwrap();
    let note = log.checkpoint(9, r).unwrap();
    // Origin, size, base64 root, a blank line, one signature line.
    let lines: Vec<&str> = note.lines().collect();
    assert_eq!(lines[..4], ["warden.example/log", "9", &r.to_string(), ""]);
    assert!(lines[4].starts_with("— warden.example/log "));

    let ring = KeyRing::new(std::slice::from_ref(&vkey)).unwrap();
    let c = ring.verify_checkpoint(&note).unwrap();
    assert_eq!((c.origin.as_str(), c.size, c.root), ("warden.example/log", 9, r));

    // Another key of the same name (an unknown key id): refused, naming it.
    let (_, other) = signer("warden.example/log");
    let e = KeyRing::new(&[other]).unwrap().verify_checkpoint(&note).unwrap_err();
    assert!(e.0.contains("unknown keys (warden.example/log+"), "{e}");
    // A tampered body: the signature no longer matches.
    let tampered = note.replacen("\n9\n", "\n8\n", 1);
    let e = ring.verify_checkpoint(&tampered).unwrap_err();
    assert!(e.0.contains("does not match the note's text"), "{e}");
    // Re-signed by someone else's key.
    let (mallory, _) = signer("warden.example/log");
    let e = ring.verify_checkpoint(&mallory.checkpoint(9, r).unwrap()).unwrap_err();
    assert!(e.0.contains("unknown keys"), "{e}");
    // A key of another log cannot vouch for this one.
    let (elsewhere, evkey) = signer("other.example/log");
    let e = KeyRing::new(std::slice::from_ref(&evkey)).unwrap().verify_checkpoint(&elsewhere.sign(&format!("warden.example/log\n9\n{r}\n")).unwrap()).unwrap_err();
    assert!(e.0.contains("of the log \"warden.example/log\", signed by the key of \"other.example/log\""), "{e}");
    // Not a note at all.
    assert!(ring.verify_checkpoint("warden.example/log\n9\n").unwrap_err().0.contains("not a signed note"));
}

#[test]
fn a_rotated_key_keeps_old_checkpoints_verifiable() {
    let (old_skey, old_vkey) = generate_log_key("warden.example/log").unwrap();
    let (new_skey, new_vkey) = generate_log_key("warden.example/log").unwrap();
    let r = root(3, &Mem::of(&leaves(3))).unwrap();
    let before = LogSigner::from_keys(std::slice::from_ref(&old_skey)).unwrap().checkpoint(3, r).unwrap();
    let during = LogSigner::from_keys(&[new_skey.clone(), old_skey]).unwrap().checkpoint(3, r).unwrap();
    let after = LogSigner::from_keys(&[new_skey]).unwrap().checkpoint(3, r).unwrap();
    let both = KeyRing::new(&[new_vkey.clone(), old_vkey.clone()]).unwrap();
    for note in [&before, &during, &after] {
        both.verify_checkpoint(note).unwrap();
    }
    let only_old = KeyRing::new(&[old_vkey]).unwrap();
    only_old.verify_checkpoint(&before).unwrap();
    only_old.verify_checkpoint(&during).unwrap();
    assert!(only_old.verify_checkpoint(&after).is_err());
    // Keys naming two different logs cannot sign together.
    let (x, _) = generate_log_key("x.example/log").unwrap();
    let (y, _) = generate_log_key("y.example/log").unwrap();
    assert!(LogSigner::from_keys(&[x, y]).is_err());
}

#[test]
fn session_heads_are_signed_and_cannot_pass_as_checkpoints() {
    let (log, vkey) = signer("warden.example/log");
    let ring = KeyRing::new(&[vkey]).unwrap();
    let head = SessionHead { origin: "warden.example/log".into(), session_id: "ses-1".into(), tree_size: 9, records: 4, hash: "ab".repeat(32) };
    let note = log.session_head(&head).unwrap();
    assert_eq!(ring.verify_head(&note).unwrap(), head);
    assert!(ring.verify_checkpoint(&note).is_err());
    let e = ring.verify_head(&note.replacen("records 4", "records 3", 1)).unwrap_err();
    assert!(e.0.contains("altered"), "{e}");
    let checkpoint = log.checkpoint(9, EMPTY_HASH).unwrap();
    assert!(ring.verify_head(&checkpoint).is_err());
}

#[test]
fn cosignatures_follow_tlog_cosignature_v1() {
    let (log, vkey) = signer("warden.example/log");
    let (wkey, wvkey) = generate_cosigner_key("witness.example/w1").unwrap();
    let note = log.checkpoint(4, root(4, &Mem::of(&leaves(4))).unwrap()).unwrap();
    let cosigned = Cosigner::new(&wkey, 1_700_000_000).unwrap().cosign(&note).unwrap();
    let c = KeyRing::new(&[vkey.clone(), wvkey.clone()]).unwrap().verify_checkpoint(&cosigned).unwrap();
    assert_eq!(c.signed_by.len(), 2);
    assert!(c.signed_by[1].starts_with("witness.example/w1+"));
    // The signature is the 8-byte time then Ed25519 over "cosignature/v1\ntime T\n" + checkpoint.
    let line = cosigned.lines().last().unwrap();
    let raw = b64(line.rsplit(' ').next().unwrap());
    assert_eq!(raw.len(), 4 + 8 + 64);
    assert_eq!(u64::from_be_bytes(raw[4..12].try_into().unwrap()), 1_700_000_000);
    let text = note.split("\n\n").next().unwrap().to_string() + "\n";
    let public: [u8; 32] = b64(wvkey.splitn(3, '+').nth(2).unwrap())[1..].try_into().unwrap();
    let msg = format!("cosignature/v1\ntime 1700000000\n{text}");
    use ed25519_dalek::Verifier as _;
    ed25519_dalek::VerifyingKey::from_bytes(&public)
        .unwrap()
        .verify(msg.as_bytes(), &ed25519_dalek::Signature::from_slice(&raw[12..]).unwrap())
        .unwrap();
    // A log key is not a witness key, and the other way round.
    assert!(Cosigner::new(&generate_log_key("a").unwrap().0, 1).is_err());
    assert!(LogSigner::from_keys(&[wkey]).is_err());
    // A witness key alone does not make a checkpoint trusted.
    assert!(KeyRing::new(&[wvkey]).is_err());
}

fn b64(s: &str) -> Vec<u8> {
    use base64::prelude::{Engine, BASE64_STANDARD};
    BASE64_STANDARD.decode(s).unwrap()
}
