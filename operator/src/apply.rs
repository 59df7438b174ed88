//! Server-side apply of namespaced objects under the operator's field manager.
//!
//! Apply with force: the operator is the only writer of the fields it sets on objects it
//! owns, so a conflict means someone edited them by hand, and the desired state wins.

use std::fmt::Debug;

use kube::api::{Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::names::MANAGER;
use crate::Error;

/// Applies `object` (which carries its name) in `namespace`.
pub async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    K: Serialize + DeserializeOwned + Clone + Debug,
{
    let name = object.meta().name.as_deref().ok_or(Error::Incomplete {
        kind: "object to apply",
        field: "metadata.name",
    })?;
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    tracing::debug!(kind = %K::kind(&()), %namespace, %name, "applying");
    Ok(api.patch(name, &params(), &Patch::Apply(object)).await?)
}

/// Parameters of every apply the operator makes.
pub fn params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}
