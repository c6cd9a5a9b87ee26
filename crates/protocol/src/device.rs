//! Device identity: an Ed25519 key, its DER SPKI as `pubkey`, and the
//! `device_id` derived from it (Part B §3, "Crypto").

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// A device's public key, as [`parse_pubkey`] returns it.
pub use ed25519_dalek::VerifyingKey;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};
use sha2::{Digest, Sha256};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32-byte key follows.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a presented key or proof was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProofError {
    /// Not base64url, not a 44-byte Ed25519 SPKI, or not a valid point.
    BadKey,
    /// Not base64url or not 64 bytes.
    BadSignature,
    /// The signature does not verify.
    Mismatch,
}

/// The DER SPKI of `key`.
pub fn spki_der(key: &VerifyingKey) -> [u8; 44] {
    let mut der = [0u8; 44];
    der[..12].copy_from_slice(&SPKI_PREFIX);
    der[12..].copy_from_slice(key.as_bytes());
    der
}

/// `dev_` + lowercase unpadded base32 of sha256(DER SPKI): 56 characters.
pub fn device_id_of_spki(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    format!(
        "dev_{}",
        data_encoding::BASE32_NOPAD
            .encode(&digest)
            .to_ascii_lowercase()
    )
}

/// The device id a `pubkey` implies: the hash of what it decodes to,
/// whether or not that is a key (Part B §3 checks the id at `connect.init`
/// and the key at `connect.proof`). None when it is not base64url.
pub fn device_id_of_pubkey(pubkey: &str) -> Option<String> {
    let der = URL_SAFE_NO_PAD.decode(pubkey.trim_end_matches('=')).ok()?;
    Some(device_id_of_spki(&der))
}

/// Decodes a `pubkey` (unpadded base64url DER SPKI) into the key and the
/// device id it implies.
pub fn parse_pubkey(pubkey: &str) -> Result<(VerifyingKey, String), ProofError> {
    let der = URL_SAFE_NO_PAD
        .decode(pubkey.trim_end_matches('='))
        .map_err(|_| ProofError::BadKey)?;
    if der.len() != 44 || der[..12] != SPKI_PREFIX {
        return Err(ProofError::BadKey);
    }
    let bytes: [u8; 32] = der[12..].try_into().map_err(|_| ProofError::BadKey)?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| ProofError::BadKey)?;
    Ok((key, device_id_of_spki(&der)))
}

/// The text a device signs to prove its key; every line ends in `\n`.
pub fn transcript(
    protocol_rev: i64,
    role: &str,
    device_id: &str,
    connection_id: &str,
    challenge: &str,
) -> String {
    format!(
        "tyrum-connect-proof\nprotocol_rev={protocol_rev}\nrole={role}\ndevice_id={device_id}\nconnection_id={connection_id}\nchallenge={challenge}\n"
    )
}

/// Checks `proof` (unpadded base64url signature) over `transcript`.
pub fn verify_proof(key: &VerifyingKey, transcript: &str, proof: &str) -> Result<(), ProofError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(proof.trim_end_matches('='))
        .map_err(|_| ProofError::BadSignature)?;
    let signature = Signature::from_slice(&bytes).map_err(|_| ProofError::BadSignature)?;
    key.verify(transcript.as_bytes(), &signature)
        .map_err(|_| ProofError::Mismatch)
}

/// A fresh challenge: base64url of 32 random bytes (43 characters).
pub fn new_challenge() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// A device's own key, for clients (the command line, tests, nodes).
pub struct DeviceKey {
    signing: SigningKey,
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKey")
            .field("device_id", &self.device_id())
            .finish_non_exhaustive()
    }
}

impl DeviceKey {
    pub fn generate() -> DeviceKey {
        DeviceKey::from_seed(rand::random())
    }

    pub fn from_seed(seed: [u8; 32]) -> DeviceKey {
        DeviceKey {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// `pubkey` as the handshake carries it.
    pub fn pubkey(&self) -> String {
        URL_SAFE_NO_PAD.encode(spki_der(&self.signing.verifying_key()))
    }

    pub fn device_id(&self) -> String {
        device_id_of_spki(&spki_der(&self.signing.verifying_key()))
    }

    /// `proof` for a transcript.
    pub fn sign(&self, transcript: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.signing.sign(transcript.as_bytes()).to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Part B §3 test vector, checked there with Node's `crypto.verify`.
    #[test]
    fn the_protocol_test_vector_verifies() {
        let seed: [u8; 32] = std::array::from_fn(|i| i as u8);
        let key = DeviceKey::from_seed(seed);
        let pubkey = "MCowBQYDK2VwAyEAA6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg";
        let device_id = "dev_ubiig7mfa4cyfthxhffqtceeptbrfs4iewnyssez63zdttyxsgsq";
        assert_eq!(key.pubkey(), pubkey);
        assert_eq!(key.device_id(), device_id);
        let (verifying, derived) = parse_pubkey(pubkey).unwrap();
        assert_eq!(derived, device_id);

        let text = transcript(
            2,
            "node",
            device_id,
            "3f1c2a9e-7b4d-4c1e-9a2f-5d6e7f8a9b0c",
            "paWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaWlpaU",
        );
        let proof = "EEsV1xsE-fh9Q24oZsHznqD2QogufqzWOF_y-eaaXEg6V7lj1MHKazRRAtPLwBZzJHe4Z5mCnRGPVozKZk4NDA";
        assert_eq!(key.sign(&text), proof);
        assert_eq!(verify_proof(&verifying, &text, proof), Ok(()));
        let other_role = text.replace("role=node", "role=client");
        assert_eq!(
            verify_proof(&verifying, &other_role, proof),
            Err(ProofError::Mismatch)
        );
    }

    #[test]
    fn malformed_keys_and_proofs_are_refused() {
        assert_eq!(parse_pubkey("not base64!").unwrap_err(), ProofError::BadKey);
        assert_eq!(device_id_of_pubkey("not base64!"), None);
        // Not a key, but it still implies an id: the init check compares
        // ids, the proof check refuses the key.
        assert_eq!(
            device_id_of_pubkey("AAAA"),
            Some(device_id_of_spki(&[0, 0, 0]))
        );
        assert_eq!(parse_pubkey("AAAA").unwrap_err(), ProofError::BadKey);
        let key = DeviceKey::generate();
        let (verifying, _) = parse_pubkey(&key.pubkey()).unwrap();
        assert_eq!(
            verify_proof(&verifying, "x", "@@").unwrap_err(),
            ProofError::BadSignature
        );
        assert_eq!(
            verify_proof(&verifying, "x", "AAAA").unwrap_err(),
            ProofError::BadSignature
        );
        assert!(new_challenge().len() == 43);
    }
}
