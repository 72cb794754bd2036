//! Processors: one module per kind, each with its config, factory and tests.

pub mod attributes;
pub mod batch;
pub mod efficiency;
pub mod filter;
pub mod genai_normalize;
pub mod percentages;
pub mod pool_aggregate;

pub use attributes::AttributesFactory;
pub use batch::BatchFactory;
pub use efficiency::EfficiencyFactory;
pub use filter::FilterFactory;
pub use genai_normalize::GenaiNormalizeFactory;
pub use percentages::PercentagesFactory;
pub use pool_aggregate::PoolAggregateFactory;
