//! The index as the module reports it (FT.INFO, summed over primaries on a cluster), refreshed
//! by the probe every second: a document acked is written, and these say whether a query can
//! find it yet.

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::store::index::IndexProgress;

#[derive(Debug, Default)]
pub struct IndexGauges {
    documents: Gauge,
    failures: Gauge,
    scanning: Gauge,
    unindexed_primaries: Gauge,
}

impl IndexGauges {
    pub fn register(registry: &mut Registry) -> Self {
        let gauges = Self::default();
        registry.register(
            "index_documents",
            "Documents in the index (FT.INFO num_docs; a chunked document counts once per chunk), summed over the primaries of a cluster, refreshed every second",
            gauges.documents.clone(),
        );
        registry.register(
            "index_failures",
            "Documents the Query Engine could not index (FT.INFO hash_indexing_failures, summed over primaries): written, and never found by a query until rewritten",
            gauges.failures.clone(),
        );
        registry.register(
            "index_scanning",
            "1 while the Query Engine scans documents that predate the index or an FT.ALTER (FT.INFO indexing, any primary): written documents may be missing from results until it ends",
            gauges.scanning.clone(),
        );
        registry.register(
            "index_unindexed_primaries",
            "Primaries of a cluster without search coordinator that have no index of their own (a primary added, or a reshard moved its index name's slot): their documents cannot be searched until the worker's next index check makes one",
            gauges.unindexed_primaries.clone(),
        );
        gauges
    }

    pub fn set(&self, p: &IndexProgress) {
        self.documents.set(p.docs as i64);
        self.failures.set(p.failures as i64);
        self.scanning.set(i64::from(p.indexing));
        self.unindexed_primaries.set(p.unindexed.len() as i64);
    }
}
