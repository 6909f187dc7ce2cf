//! `egress-cni`: IPv4 egress for an IPv6 node's pods, chained after `aws-cni` (see
//! `aws_cni::egress`). The result, or the CNI error JSON, goes to stdout.

fn main() {
    aws_cni::exec(aws_cni::egress::run);
}
