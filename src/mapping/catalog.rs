//! What the rest of the relay asks of the mapping: a product's Smaregi id
//! for an external code, and back. [`MappingStore`] answers from its
//! current version; [`IdentityCatalog`] stands in where no mapping exists
//! (tests, tools).

use super::MappingStore;

/// The products the mapping knows, both ways, and its version.
pub trait Catalog: Send + Sync + 'static {
    /// External code → Smaregi 商品ID.
    fn smaregi_id_for(&self, external_code: &str) -> Option<String>;
    /// Smaregi 商品ID → external code.
    fn external_code_for(&self, smaregi_product_id: &str) -> Option<String>;
    /// The mapping version answers come from (0: none imported).
    fn version(&self) -> u64;
}

/// The catalog before any mapping exists: a code that is a valid 商品ID
/// is that product, and the other way round.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityCatalog;

impl Catalog for IdentityCatalog {
    fn smaregi_id_for(&self, code: &str) -> Option<String> {
        crate::orders::model::valid_smaregi_product_id(code).then(|| code.to_owned())
    }

    fn external_code_for(&self, id: &str) -> Option<String> {
        self.smaregi_id_for(id)
    }

    fn version(&self) -> u64 {
        0
    }
}

impl Catalog for MappingStore {
    fn smaregi_id_for(&self, external_code: &str) -> Option<String> {
        self.current().smaregi_id_for(external_code)
    }

    fn external_code_for(&self, smaregi_product_id: &str) -> Option<String> {
        self.current().external_code_for(smaregi_product_id)
    }

    fn version(&self) -> u64 {
        self.current().version()
    }
}
