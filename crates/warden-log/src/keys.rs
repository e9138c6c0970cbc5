//! Keys and signed notes: the log's checkpoints and session heads (signed by the service's log
//! keys, C2SP signed-note Ed25519), and witnesses' cosignatures (C2SP tlog-cosignature v1).
//! Verification errors name what is wrong: an unknown key id, a signature that does not match
//! its text, a checkpoint of another log.

use base64::prelude::{Engine, BASE64_STANDARD};
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use signed_note::{Note, NoteError, Signer, StandardSigner, StandardVerifier, Verifier, VerifierList};
use tlog_tiles::{Checkpoint, Hash};

use crate::{err, LogError};

const ALG_ED25519: u8 = 0x01;
/// tlog-cosignature's key type for Ed25519 cosignatures (key ids differ from log keys').
const ALG_COSIGNATURE_V1: u8 = 0x04;

/// The first line of a session head note: never a tree size, so it cannot pass as a checkpoint.
pub const HEAD_HEADER: &str = "warden-session-head/v1";

fn key_name_ok(name: &str) -> Result<(), LogError> {
    if signed_note::is_key_name_valid(name) {
        Ok(())
    } else {
        Err(err(format!("{name:?} is not a valid key name (non-empty, no spaces, no '+')")))
    }
}

/// A new log key named `name` (the log's origin): the signer key to keep secret and the
/// verifier key to publish.
pub fn generate_log_key(name: &str) -> Result<(String, String), LogError> {
    key_name_ok(name)?;
    Ok(signed_note::generate_key(&mut rand_core::OsRng, name))
}

/// A new witness key: `PRIVATE+KEY+<name>+<id>+base64(0x04 || seed)` and its verifier key.
pub fn generate_cosigner_key(name: &str) -> Result<(String, String), LogError> {
    key_name_ok(name)?;
    let key = SigningKey::generate(&mut rand_core::OsRng);
    let public = [&[ALG_COSIGNATURE_V1], key.verifying_key().as_bytes().as_slice()].concat();
    let id = signed_note::key_id(name, &public);
    let private = [&[ALG_COSIGNATURE_V1], key.to_bytes().as_slice()].concat();
    Ok((
        format!("PRIVATE+KEY+{name}+{id:08x}+{}", BASE64_STANDARD.encode(private)),
        format!("{name}+{id:08x}+{}", BASE64_STANDARD.encode(public)),
    ))
}

/// `PRIVATE+KEY+<name>+<id>+<base64 key>` → (name, id, key bytes with their type byte).
fn parse_private(text: &str) -> Result<(String, u32, Vec<u8>), LogError> {
    let bad = || err("not a signer key (PRIVATE+KEY+<name>+<id>+<base64>)");
    let rest = text.trim().strip_prefix("PRIVATE+KEY+").ok_or_else(bad)?;
    // Base64 has '+' too: the key is everything after the second one.
    let mut parts = rest.splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let id = u32::from_str_radix(id, 16).map_err(|_| bad())?;
    let key = BASE64_STANDARD.decode(key).map_err(|_| bad())?;
    Ok((name.to_string(), id, key))
}

/// The service's log keys: every checkpoint and session head is signed by each of them. The
/// first names the log (its origin); more than one is for a rotation (publish the new verifier
/// key, sign with both, then drop the old one: what the old key signed still verifies with it).
pub struct LogSigner {
    origin: String,
    signers: Vec<StandardSigner>,
    verifier_keys: Vec<String>,
}

impl LogSigner {
    /// From signer keys' texts (key files' contents).
    pub fn from_keys(texts: &[String]) -> Result<Self, LogError> {
        let mut origin = None;
        let (mut signers, mut verifier_keys) = (Vec::new(), Vec::new());
        for text in texts {
            let (name, _, key) = parse_private(text)?;
            let seed: [u8; 32] = match key.split_first() {
                Some((&ALG_ED25519, seed)) => seed.try_into().map_err(|_| err("an Ed25519 signer key has 32 bytes"))?,
                _ => return Err(err(format!("the key {name} is not an Ed25519 log key"))),
            };
            let signer = StandardSigner::new(text.trim()).map_err(|e| err(format!("the key {name} is not valid: {e}")))?;
            verifier_keys.push(signed_note::new_ed25519_verifier_key(&name, &SigningKey::from_bytes(&seed).verifying_key()));
            match &origin {
                None => origin = Some(name),
                Some(o) if *o != name => return Err(err(format!("every log key must name the same log: {o} and {name}"))),
                Some(_) => {}
            }
            signers.push(signer);
        }
        let origin = origin.ok_or_else(|| err("no log key"))?;
        Ok(Self { origin, signers, verifier_keys })
    }

    /// The log's origin line: its keys' name.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The public verifier keys (safe to print and publish).
    pub fn verifier_keys(&self) -> &[String] {
        &self.verifier_keys
    }

    pub(crate) fn sign(&self, text: &str) -> Result<String, LogError> {
        let mut note = Note::new(text.as_bytes(), &[]).map_err(|e| err(format!("cannot make a note: {e}")))?;
        let signers: Vec<&dyn Signer> = self.signers.iter().map(|s| s as &dyn Signer).collect();
        note.add_sigs(&signers).map_err(|e| err(format!("cannot sign: {e}")))?;
        String::from_utf8(note.to_bytes()).map_err(|_| err("a note is UTF-8"))
    }

    /// A signed checkpoint (C2SP tlog-checkpoint) of the tree of `size` leaves with root `root`.
    pub fn checkpoint(&self, size: u64, root: Hash) -> Result<String, LogError> {
        let c = Checkpoint::new(&self.origin, size, root, "").map_err(|e| err(e.to_string()))?;
        self.sign(&String::from_utf8(c.to_bytes()).map_err(|_| err("a checkpoint is UTF-8"))?)
    }

    /// A signed session head.
    pub fn session_head(&self, head: &SessionHead) -> Result<String, LogError> {
        if head.origin != self.origin {
            return Err(err("a session head names the log that signs it"));
        }
        self.sign(&head.to_text())
    }
}

/// How many records a session had in the log at a tree size, and its last chain hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHead {
    pub origin: String,
    pub session_id: String,
    pub tree_size: u64,
    pub records: u64,
    /// The last record's chain hash, hex (the genesis hash when there is none).
    pub hash: String,
}

impl SessionHead {
    pub fn to_text(&self) -> String {
        format!(
            "{HEAD_HEADER}\norigin {}\nsession {}\ntree {}\nrecords {}\nhash {}\n",
            self.origin, self.session_id, self.tree_size, self.records, self.hash
        )
    }

    pub fn parse(text: &str) -> Result<Self, LogError> {
        let bad = || err("not a session head");
        let mut lines = text.strip_suffix('\n').ok_or_else(bad)?.split('\n');
        if lines.next() != Some(HEAD_HEADER) {
            return Err(bad());
        }
        let mut field = |name: &str| -> Result<String, LogError> {
            lines.next().and_then(|l| l.strip_prefix(name)).and_then(|l| l.strip_prefix(' ')).map(str::to_string).ok_or_else(bad)
        };
        let origin = field("origin")?;
        let session_id = field("session")?;
        let tree_size = field("tree")?.parse().map_err(|_| bad())?;
        let records = field("records")?.parse().map_err(|_| bad())?;
        let hash = field("hash")?;
        if lines.next().is_some() {
            return Err(bad());
        }
        Ok(Self { origin, session_id, tree_size, records, hash })
    }
}

/// A checkpoint whose signature by one of the log's keys verified.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedCheckpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// The note as given (signatures included).
    pub note: String,
    /// `name+id` of the keys whose signatures verified (log keys and known witnesses).
    pub signed_by: Vec<String>,
}

/// The public keys a verifier trusts: log keys (Ed25519 signed-note, type 0x01) and witness
/// keys (tlog-cosignature, type 0x04), each `<name>+<id>+<base64>`.
pub struct KeyRing {
    log: Vec<StandardVerifier>,
    witnesses: Vec<CosignatureVerifier>,
}

impl KeyRing {
    pub fn new(vkeys: &[String]) -> Result<Self, LogError> {
        let (mut log, mut witnesses) = (Vec::new(), Vec::new());
        for vkey in vkeys {
            let vkey = vkey.trim();
            let bad = |why: &str| err(format!("{vkey:?} is not a verifier key ({why})"));
            let mut parts = vkey.splitn(3, '+');
            let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad("<name>+<id>+<base64>"));
            };
            let bytes = BASE64_STANDARD.decode(key).map_err(|_| bad("base64"))?;
            match bytes.first() {
                Some(&ALG_ED25519) => log.push(StandardVerifier::new(vkey).map_err(|e| bad(&e.to_string()))?),
                Some(&ALG_COSIGNATURE_V1) => {
                    let id = u32::from_str_radix(id, 16).map_err(|_| bad("key id"))?;
                    if id != signed_note::key_id(name, &bytes) {
                        return Err(bad("its key id does not match its key"));
                    }
                    let public: [u8; 32] = bytes[1..].try_into().map_err(|_| bad("32-byte key"))?;
                    let key = VerifyingKey::from_bytes(&public).map_err(|_| bad("Ed25519 key"))?;
                    witnesses.push(CosignatureVerifier { name: name.to_string(), id, key });
                }
                _ => return Err(bad("unknown key type")),
            }
        }
        if log.is_empty() {
            return Err(err("no log verifier key given"));
        }
        Ok(Self { log, witnesses })
    }

    fn all(&self) -> VerifierList {
        let mut list: Vec<Box<dyn Verifier>> = self.log.iter().map(|v| Box::new(v.clone()) as Box<dyn Verifier>).collect();
        list.extend(self.witnesses.iter().map(|w| Box::new(w.clone()) as Box<dyn Verifier>));
        VerifierList::new(list)
    }

    fn is_log_key(&self, name: &str, id: u32) -> bool {
        self.log.iter().any(|v| v.name() == name && v.key_id() == id)
    }

    /// The text of a note signed by at least one of the log's keys, and who signed it.
    fn open(&self, note: &str) -> Result<(String, String, Vec<String>), LogError> {
        let parsed = Note::from_bytes(note.as_bytes()).map_err(|_| err("not a signed note (text, blank line, signature lines)"))?;
        let (verified, _) = parsed.verify(&self.all()).map_err(|e| match e {
            NoteError::UnverifiedNote => err(format!("signed only by unknown keys ({}): re-signed, or a key you were not given", signers_of(note).join(", "))),
            NoteError::InvalidSignature { name, id } => err(format!("the signature of {name}+{id:08x} does not match the note's text (the note was altered)")),
            e => err(format!("its signatures do not verify: {e}")),
        })?;
        let log_signer = verified.iter().find(|s| self.is_log_key(s.name(), s.id()));
        let Some(signer) = log_signer else {
            return Err(err(format!("not signed by a log key you gave (signed by {})", signers_of(note).join(", "))));
        };
        let text = String::from_utf8(parsed.text().to_vec()).map_err(|_| err("a note is UTF-8"))?;
        let signed_by = verified.iter().map(|s| format!("{}+{:08x}", s.name(), s.id())).collect();
        Ok((text, signer.name().to_string(), signed_by))
    }

    /// A checkpoint signed by one of the log's keys, whose origin is that key's name.
    pub fn verify_checkpoint(&self, note: &str) -> Result<VerifiedCheckpoint, LogError> {
        let (text, signer, signed_by) = self.open(note).map_err(|e| err(format!("checkpoint: {e}")))?;
        let c = Checkpoint::from_bytes(text.as_bytes()).map_err(|_| err("checkpoint: its text is not a checkpoint (origin, size, root hash)"))?;
        if c.origin() != signer {
            return Err(err(format!("checkpoint: it is of the log {:?}, signed by the key of {signer:?}", c.origin())));
        }
        Ok(VerifiedCheckpoint { origin: c.origin().to_string(), size: c.size(), root: *c.hash(), note: note.to_string(), signed_by })
    }

    /// A session head signed by one of the log's keys, naming that key's log.
    pub fn verify_head(&self, note: &str) -> Result<SessionHead, LogError> {
        let (text, signer, _) = self.open(note).map_err(|e| err(format!("session head: {e}")))?;
        let head = SessionHead::parse(&text).map_err(|e| err(format!("session head: {e}")))?;
        if head.origin != signer {
            return Err(err(format!("session head: it names the log {:?}, signed by the key of {signer:?}", head.origin)));
        }
        Ok(head)
    }
}

/// `name+id` of every signature line of a note (whether or not it verifies).
fn signers_of(note: &str) -> Vec<String> {
    let Some((_, sigs)) = note.rsplit_once("\n\n") else { return Vec::new() };
    sigs.lines()
        .filter_map(|l| {
            let (name, b64) = l.strip_prefix("— ")?.split_once(' ')?;
            let bytes = BASE64_STANDARD.decode(b64).ok()?;
            let id = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
            Some(format!("{name}+{id:08x}"))
        })
        .collect()
}

/// The cosigned message: tlog-cosignature v1's header and time lines, then the checkpoint.
fn cosigned_message(time: u64, checkpoint_text: &[u8]) -> Vec<u8> {
    let mut m = format!("cosignature/v1\ntime {time}\n").into_bytes();
    m.extend_from_slice(checkpoint_text);
    m
}

/// A witness's key: signs a checkpoint it has checked as consistent with what it saw before.
pub struct Cosigner {
    name: String,
    id: u32,
    key: SigningKey,
    time: u64,
}

impl Cosigner {
    /// From the key file's text (`generate_cosigner_key`); `time` is the cosignature's timestamp
    /// (seconds since the epoch).
    pub fn new(text: &str, time: u64) -> Result<Self, LogError> {
        let (name, id, key) = parse_private(text)?;
        let seed: [u8; 32] = match key.split_first() {
            Some((&ALG_COSIGNATURE_V1, seed)) => seed.try_into().map_err(|_| err("an Ed25519 cosigner key has 32 bytes"))?,
            _ => return Err(err(format!("the key {name} is not a witness (cosignature) key"))),
        };
        let key = SigningKey::from_bytes(&seed);
        let public = [&[ALG_COSIGNATURE_V1], key.verifying_key().as_bytes().as_slice()].concat();
        if signed_note::key_id(&name, &public) != id {
            return Err(err(format!("the key {name}'s id does not match its key")));
        }
        Ok(Self { name, id, key, time })
    }

    /// The checkpoint note with this witness's cosignature added.
    pub fn cosign(&self, note: &str) -> Result<String, LogError> {
        let mut n = Note::from_bytes(note.as_bytes()).map_err(|_| err("not a signed note"))?;
        n.add_sigs(&[self as &dyn Signer]).map_err(|e| err(format!("cannot cosign: {e}")))?;
        String::from_utf8(n.to_bytes()).map_err(|_| err("a note is UTF-8"))
    }
}

impl Signer for Cosigner {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_id(&self) -> u32 {
        self.id
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        let sig = self.key.sign(&cosigned_message(self.time, msg));
        Ok([self.time.to_be_bytes().as_slice(), sig.to_bytes().as_slice()].concat())
    }
}

#[derive(Clone)]
struct CosignatureVerifier {
    name: String,
    id: u32,
    key: VerifyingKey,
}

impl Verifier for CosignatureVerifier {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_id(&self) -> u32 {
        self.id
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        let (Some(time), Some(sig)) = (sig.get(..8), sig.get(8..)) else { return false };
        let (Ok(time), Ok(sig)) = (<[u8; 8]>::try_from(time), ed25519_dalek::Signature::from_slice(sig)) else { return false };
        self.key.verify(&cosigned_message(u64::from_be_bytes(time), msg), &sig).is_ok()
    }
}
