//! Properties of the batch type for any input (proptest): splitting keeps every point, in
//! order, under its resource and scope; our encoder's bytes decode back to the same batch.

use genai_collector_core::model::{
    kv, metric, number_point, Batch, ExportMetricsServiceRequest, Histogram, HistogramDataPoint,
    Metric, MetricExt,
};
use proptest::prelude::*;
use prost::Message;

fn point() -> impl Strategy<Value = (u64, f64, Vec<(String, i64)>)> {
    (
        any::<u64>(),
        any::<f64>(),
        prop::collection::vec(("[a-z.]{1,6}", any::<i64>()), 0..3),
    )
}

fn metric() -> impl Strategy<Value = Metric> {
    (
        "[a-z_:]{1,12}",
        0u8..3,
        prop::collection::vec(point(), 0..6),
    )
        .prop_map(|(name, kind, points)| {
            let numbers = points
                .iter()
                .map(|(t, v, a)| {
                    number_point(*t, *v, a.iter().map(|(k, v)| kv(k.as_str(), *v)).collect())
                })
                .collect();
            match kind {
                0 => Metric::gauge(&name, "1", numbers),
                1 => Metric::sum(&name, "s", true, numbers),
                _ => Metric {
                    name,
                    data: Some(metric::Data::Histogram(Histogram {
                        data_points: points
                            .iter()
                            .map(|(t, _, _)| HistogramDataPoint {
                                time_unix_nano: *t,
                                count: t % 7,
                                bucket_counts: vec![t % 7],
                                ..Default::default()
                            })
                            .collect(),
                        aggregation_temporality: 2,
                    })),
                    ..Default::default()
                },
            }
        })
}

fn batch() -> impl Strategy<Value = Batch> {
    prop::collection::vec(("[a-z]{1,8}", prop::collection::vec(metric(), 0..4)), 0..4).prop_map(
        |resources| {
            let mut b = Batch::new();
            for (service, metrics) in resources {
                b.push_resource(vec![kv("service.name", service.as_str())], metrics);
            }
            b
        },
    )
}

/// Every point with its resource, scope and metric, in order.
fn flatten(b: &Batch) -> Vec<String> {
    let mut out = Vec::new();
    for rm in &b.resource_metrics {
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let points: Vec<String> = match &m.data {
                    Some(metric::Data::Gauge(g)) => {
                        g.data_points.iter().map(|p| format!("{p:?}")).collect()
                    }
                    Some(metric::Data::Sum(s)) => {
                        s.data_points.iter().map(|p| format!("{p:?}")).collect()
                    }
                    Some(metric::Data::Histogram(h)) => {
                        h.data_points.iter().map(|p| format!("{p:?}")).collect()
                    }
                    _ => Vec::new(),
                };
                for p in points {
                    out.push(format!("{:?}|{:?}|{}|{p}", rm.resource, sm.scope, m.name));
                }
            }
        }
    }
    out
}

proptest! {
    #[test]
    fn split_keeps_every_point_in_order_under_its_resource(b in batch(), max in 0usize..9) {
        let parts = b.clone().split(max);
        if max > 0 {
            for p in &parts {
                prop_assert!(p.point_count() <= max, "a part of {} points", p.point_count());
            }
        }
        let joined: Vec<String> = parts.iter().flat_map(flatten).collect();
        prop_assert_eq!(joined, flatten(&b));
    }

    #[test]
    fn our_encoding_decodes_to_the_same_batch(b in batch()) {
        let bytes = b.encode_request();
        prop_assert_eq!(&bytes, &b.clone().into_request().encode_to_vec(), "byte-identical to prost");
        let back = Batch::from_request(ExportMetricsServiceRequest::decode(&bytes[..]).unwrap());
        // Compared as text and bytes: a NaN point never equals itself.
        prop_assert_eq!(flatten(&back), flatten(&b));
        prop_assert_eq!(back.encode_request(), bytes);
    }
}
