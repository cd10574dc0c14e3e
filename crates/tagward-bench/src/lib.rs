//! Tagward's benchmark tooling, which the `tagward` binary does not ship:
//! [`gen`] (a seeded world and request mix), [`load`] (a ghz-like load
//! generator with a baseline ratio and tag-change visibility) and
//! [`baseline`] (the empty Authorizer the load tool compares against).

pub mod baseline;
pub mod decision_world;
pub mod fleet;
pub mod gen;
pub mod load;
