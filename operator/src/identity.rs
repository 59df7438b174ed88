//! A member's libp2p identity: an Ed25519 keypair in libp2p's protobuf encoding (what the
//! node reads from its key file) and the peer id it gives.
//!
//! The key is generated once, stored in a Secret and never regenerated: every other
//! member's configuration lists this peer id, and only listed identities may connect.

use k8s_openapi::api::core::v1::Secret;
use libp2p_identity::Keypair;

use crate::names::IDENTITY_KEY;

/// A member's key and peer id.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// The keypair, protobuf-encoded.
    pub key: Vec<u8>,
    /// Base58 peer id derived from the public key.
    pub peer_id: String,
}

impl std::fmt::Debug for Identity {
    // Keeps private keys out of logs and test failure output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

/// Why an identity could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("Secret has no data key {IDENTITY_KEY:?}")]
    Missing,
    #[error("key in the Secret is not a libp2p protobuf-encoded keypair: {0}")]
    Decode(#[source] libp2p_identity::DecodingError),
    #[error("encoding a new keypair: {0}")]
    Encode(#[source] libp2p_identity::DecodingError),
}

impl Identity {
    /// A fresh Ed25519 identity.
    pub fn generate() -> Result<Identity, IdentityError> {
        Identity::from_keypair(&Keypair::generate_ed25519())
    }

    /// The identity of a 32-byte Ed25519 secret; deterministic, for tests and fixtures.
    pub fn from_seed(mut seed: [u8; 32]) -> Result<Identity, IdentityError> {
        let keypair = Keypair::ed25519_from_bytes(&mut seed).map_err(IdentityError::Encode)?;
        Identity::from_keypair(&keypair)
    }

    fn from_keypair(keypair: &Keypair) -> Result<Identity, IdentityError> {
        Ok(Identity {
            key: keypair
                .to_protobuf_encoding()
                .map_err(IdentityError::Encode)?,
            peer_id: keypair.public().to_peer_id().to_string(),
        })
    }

    /// Reads the identity kept in a member's Secret.
    pub fn from_secret(secret: &Secret) -> Result<Identity, IdentityError> {
        let bytes = secret
            .data
            .as_ref()
            .and_then(|d| d.get(IDENTITY_KEY))
            .ok_or(IdentityError::Missing)?;
        let keypair = Keypair::from_protobuf_encoding(&bytes.0).map_err(IdentityError::Decode)?;
        Identity::from_keypair(&keypair)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    #[test]
    fn a_stored_key_gives_back_the_same_peer_id() {
        let id = Identity::generate().unwrap();
        let secret = Secret {
            data: Some(BTreeMap::from([(
                IDENTITY_KEY.to_string(),
                ByteString(id.key.clone()),
            )])),
            ..Secret::default()
        };
        assert_eq!(Identity::from_secret(&secret).unwrap(), id);
        assert!(id.peer_id.starts_with("12D3KooW"), "{}", id.peer_id);
    }

    #[test]
    fn seeded_identities_are_stable_and_distinct() {
        let a = Identity::from_seed([1; 32]).unwrap();
        assert_eq!(a, Identity::from_seed([1; 32]).unwrap());
        assert_ne!(a.peer_id, Identity::from_seed([2; 32]).unwrap().peer_id);
    }

    #[test]
    fn a_damaged_secret_is_an_error_not_a_new_key() {
        let secret = Secret {
            data: Some(BTreeMap::from([(
                IDENTITY_KEY.to_string(),
                ByteString(vec![1, 2, 3]),
            )])),
            ..Secret::default()
        };
        assert!(matches!(
            Identity::from_secret(&secret),
            Err(IdentityError::Decode(_))
        ));
        assert!(matches!(
            Identity::from_secret(&Secret::default()),
            Err(IdentityError::Missing)
        ));
    }
}
