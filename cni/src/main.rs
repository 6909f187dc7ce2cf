//! `aws-cni`: exec'd by the container runtime. The result, or the CNI error JSON,
//! goes to stdout; the exit status is 0 on success and 1 on error.

fn main() {
    aws_cni::exec(aws_cni::plugin::run);
}
