//! Rust upcasters, for steps an expression cannot say well. Upcast files name them
//! with `rust = "<name>"`.

use engine::schemas::{RustUpcasters, UpcastOutput};
use serde_json::Value as Json;

/// Every Rust upcaster, by name.
pub fn registry() -> RustUpcasters {
    let upcasters: [(&'static str, engine::schemas::RustUpcaster); 1] = [(
        "order_shipped_carrier_from_tracking_id",
        order_shipped_carrier_from_tracking_id,
    )];
    upcasters.into_iter().collect()
}

/// OrderShipped v1 -> v2: carriers put their name before the first `-` of their
/// tracking ids (`DHL-123`, `UPS-9`); anything else is `unknown`.
fn order_shipped_carrier_from_tracking_id(input: &Json) -> Result<Vec<UpcastOutput>, String> {
    let mut payload = input.clone();
    let tracking_id = input["trackingId"]
        .as_str()
        .ok_or_else(|| format!("trackingId is {}, not a string", input["trackingId"]))?;
    let carrier = match tracking_id.split_once('-') {
        Some((prefix, _)) if matches!(prefix, "DHL" | "UPS" | "FEDEX" | "GLS") => prefix,
        _ => "unknown",
    };
    payload["carrier"] = Json::String(carrier.to_owned());
    Ok(vec![UpcastOutput {
        event: "shop.orders.OrderShipped".to_owned(),
        version: 2,
        payload,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn carrier_comes_from_the_tracking_id_prefix() {
        let out = order_shipped_carrier_from_tracking_id(
            &json!({"orderId": "o", "trackingId": "DHL-42", "shippedAt": 1}),
        )
        .unwrap();
        assert_eq!(out[0].payload["carrier"], "DHL");
        let out = order_shipped_carrier_from_tracking_id(
            &json!({"orderId": "o", "trackingId": "T-1", "shippedAt": 1}),
        )
        .unwrap();
        assert_eq!(out[0].payload["carrier"], "unknown");
    }

    #[test]
    fn the_repository_schema_set_checks_with_these_upcasters() {
        let dir = std::path::PathBuf::from(
            std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../schemas");
        let set = engine::schemas::SchemaSet::load(&dir, &registry()).unwrap();
        assert_eq!(
            set.check().unwrap(),
            3,
            "OrderPlaced v1->v2->v3 and OrderShipped v1->v2"
        );
    }
}
