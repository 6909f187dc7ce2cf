//! deploy/iam-policy.json lists exactly the EC2 actions ipamd's code calls: read from the
//! SDK calls in ipamd/src/aws.rs (every `.client.<operation>()`), not from a hand list.

use std::collections::BTreeSet;

fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// Every `client . op (` in the source, whitespace and line breaks allowed between.
fn sdk_operations(src: &str) -> BTreeSet<String> {
    let compact: String = src.split_whitespace().collect::<Vec<_>>().join("");
    let mut ops = BTreeSet::new();
    let mut rest = compact.as_str();
    while let Some(i) = rest.find(".client.") {
        rest = &rest[i + ".client.".len()..];
        let op: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // aws-config's IMDS client (`.get`) is not EC2.
        if rest[op.len()..].starts_with('(') && op != "get" {
            ops.insert(op);
        }
    }
    ops
}

#[test]
fn the_iam_policy_lists_exactly_the_ec2_actions_the_code_calls() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(root.join("src/aws.rs")).unwrap();
    let mut wanted: BTreeSet<String> = sdk_operations(&src)
        .iter()
        .map(|o| format!("ec2:{}", pascal(o)))
        .collect();
    assert!(
        wanted.len() >= 10,
        "found too few SDK calls to trust the scan: {wanted:?}"
    );
    // Tags given at creation (TagSpecifications) need ec2:CreateTags.
    if src.contains("TagSpecification") {
        wanted.insert("ec2:CreateTags".into());
    }
    let policy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("../deploy/iam-policy.json")).unwrap(),
    )
    .unwrap();
    let listed: BTreeSet<String> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| {
            s["Action"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
        })
        .collect();
    let missing: Vec<_> = wanted.difference(&listed).collect();
    let extra: Vec<_> = listed.difference(&wanted).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "policy is missing {missing:?} and grants unused {extra:?}"
    );
    for s in policy["Statement"].as_array().unwrap() {
        assert_eq!(s["Effect"], "Allow");
    }
}

#[test]
fn the_scan_finds_calls_split_across_lines() {
    let ops = sdk_operations(
        "self\n    .client\n    .assign_private_ip_addresses()\n self.client.get(&p)",
    );
    assert_eq!(
        ops.into_iter().collect::<Vec<_>>(),
        vec!["assign_private_ip_addresses".to_string()]
    );
    assert_eq!(pascal("describe_instance_types"), "DescribeInstanceTypes");
}
