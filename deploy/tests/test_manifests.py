"""deploy/ checked against the schemas of Kubernetes and against the code it deploys."""

import glob
import os
import re
import subprocess
import tempfile

import pytest
import yaml

DEPLOY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(DEPLOY)
ENTRYPOINT = os.environ.get("AWS_VPC_CNI_BIN", os.path.join(ROOT, "target/debug/aws-vpc-cni"))


def load(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def by_kind(docs):
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def node():
    return by_kind(load("aws-node.yaml"))


def test_every_manifest_passes_the_kubernetes_schema_strictly():
    files = sorted(glob.glob(os.path.join(DEPLOY, "*.yaml")))
    assert len(files) == 5, files
    out = subprocess.run(["kubernetes-validate", "--strict", *files], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("passed") == 10, out.stdout


def test_the_schema_check_catches_a_misplaced_field(node, tmp_path):
    ds = node["DaemonSet"]
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["spec"]["containers"][0]["capabilties"] = {"add": ["NET_ADMIN"]}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    out = subprocess.run(["kubernetes-validate", "--strict", str(p)], capture_output=True, text=True)
    assert out.returncode != 0, out.stdout


def test_daemonset_runs_on_the_host_network_with_two_capabilities(node):
    ds = node["DaemonSet"]
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "10%"},
    }
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    (main,) = spec["containers"]
    sc = main["securityContext"]
    assert sorted(sc["capabilities"]["add"]) == ["NET_ADMIN", "NET_RAW"]
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc.get("privileged", False)
    assert sc["allowPrivilegeEscalation"] is False
    # Only the init container is privileged, and it runs our sysctl step, nothing else.
    (init,) = spec["initContainers"]
    assert init["command"] == ["/app/aws-vpc-cni", "init"]
    assert not init.get("volumeMounts")


def test_host_paths_are_exactly_what_the_code_uses(node):
    spec = node["DaemonSet"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    assert set(volumes.values()) == {
        "/opt/cni/bin",  # aws-cni installed by the entrypoint
        "/etc/cni/net.d",  # 10-aws.conflist
        "/var/run/aws-node",  # ipamd's socket and checkpoint
        "/run/xtables.lock",  # iptables' lock shared with kube-proxy
    }
    (main,) = spec["containers"]
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert set(mounts) == set(volumes), "every volume mounted, no more"
    env = {e["name"]: e.get("value") for e in main["env"]}
    # Where the entrypoint and ipamd look, by default, is where the volumes are.
    entry = open(os.path.join(ROOT, "ipamd/src/entrypoint.rs")).read()
    config = open(os.path.join(ROOT, "ipamd/core/src/config.rs")).read()
    assert '"HOST_CNI_BIN_PATH", "/host/opt/cni/bin"' in entry
    assert '"HOST_CNI_CONFDIR_PATH", "/host/etc/cni/net.d"' in entry
    assert mounts["cni-bin-dir"] == "/host/opt/cni/bin"
    assert mounts["cni-net-dir"] == "/host/etc/cni/net.d"
    assert '"/var/run/aws-node/ipamd.sock"' in config and '"/var/run/aws-node/ipam.json"' in config
    assert mounts["run-dir"] == "/var/run/aws-node"
    assert "IPAMD_SOCKET" not in env and "AWS_VPC_K8S_CNI_BACKING_STORE" not in env


def test_probes_use_the_grpc_health_check(node):
    (main,) = node["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["exec"]["command"] == ["/app/ipamd", "health"], probe
    main_rs = open(os.path.join(ROOT, "ipamd/src/main.rs")).read()
    assert 'Some("health")' in main_rs


def knobs_read_by_the_code():
    names = set()
    for f in ["ipamd/core/src/config.rs", "ipamd/src/main.rs", "ipamd/src/entrypoint.rs"]:
        names |= set(re.findall(r'"([A-Z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+)"', open(os.path.join(ROOT, f)).read()))
    return names


def test_every_env_var_is_one_the_code_reads(node):
    (main,) = node["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    known = knobs_read_by_the_code()
    assert "WARM_ENI_TARGET" in known and "ENABLE_IPv4" in known and "HOST_CNI_BIN_PATH" in known
    unknown = [e["name"] for e in main["env"] if e["name"] not in known]
    assert not unknown, f"env vars no code reads (typo?): {unknown}"


def test_the_entrypoint_accepts_the_manifest_env(node):
    """The real entrypoint validates the DaemonSet's env (exit 2 names a bad one)."""
    assert os.access(ENTRYPOINT, os.X_OK), f"build it first: {ENTRYPOINT} (cargo build -p ipamd)"
    (main,) = node["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    env = {"PATH": os.environ["PATH"]}
    for e in main["env"]:
        env[e["name"]] = e.get("value", "node-1")
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "aws-cni"), "w").write("plugin")
        env.update(
            HOST_CNI_BIN_PATH=f"{d}/bin",
            HOST_CNI_CONFDIR_PATH=f"{d}/net.d",
            CNI_PLUGIN_SOURCE_DIR=d,
            IPAMD_BIN="/bin/false",
            IPAMD_SOCKET=f"{d}/ipamd.sock",
        )
        out = subprocess.run([ENTRYPOINT], env=env, capture_output=True, text=True, timeout=60)
        assert "exited before it became healthy" in out.stderr, out.stderr
        env["AWS_VPC_K8S_CNI_RANDOMIZESNAT"] = "always"
        out = subprocess.run([ENTRYPOINT], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "AWS_VPC_K8S_CNI_RANDOMIZESNAT" in out.stderr, out.stderr


def crates_using_kube():
    hits = []
    for toml in glob.glob(os.path.join(ROOT, "**/Cargo.toml"), recursive=True):
        if "/target/" in toml or "/.build/" in toml:
            continue
        if re.search(r'^\s*kube(-runtime|-client)?\s*=', open(toml).read(), re.M):
            hits.append(toml)
    return hits


def test_rbac_is_least_privilege_and_follows_the_code(node):
    sa, role, binding = node["ServiceAccount"], node["ClusterRole"], node["ClusterRoleBinding"]
    ds = node["DaemonSet"]
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ds["metadata"]["namespace"]}]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"], rule
        assert not set(rule["verbs"]) & {"create", "update", "delete", "deletecollection", "escalate", "bind"}, rule
        assert "secrets" not in rule["resources"], rule
    if not crates_using_kube():
        # No Kubernetes client in the code: no grant, no token.
        assert role["rules"] == []
        assert sa["automountServiceAccountToken"] is False
        assert ds["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    else:
        # ipamd watches its own node (cordons, kubelet's capacity) and, with custom
        # networking, ENIConfigs (ipamd/src/kube.rs): list + watch on those, no more.
        assert role["rules"] == [
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
            {"apiGroups": ["crd.k8s.amazonaws.com"], "resources": ["eniconfigs"], "verbs": ["list", "watch"]},
        ]
        assert sa["automountServiceAccountToken"] is True
        assert ds["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
        env = {e["name"]: e for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["MY_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def knob_grant(node, name):
    """A knob's own RBAC file: its ClusterRole's rules, once its binding is checked to bind
    that role to aws-node's ServiceAccount and nothing else."""
    extra = by_kind(load(name))
    role, binding = extra["ClusterRole"], extra["ClusterRoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]}
    sa = node["ServiceAccount"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": sa["metadata"]["namespace"]}]
    return role["rules"]


def test_annotate_pod_ip_grants_patch_on_pods_and_nothing_else(node):
    """ANNOTATE_POD_IP's own grant, applied only with the knob: patch on pods, bound to
    aws-node's ServiceAccount; the main role never touches pods."""
    rules = knob_grant(node, "rbac-annotate-pod-ip.yaml")
    assert rules == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    assert all("pods" not in r["resources"] for r in node["ClusterRole"]["rules"])
    src = open(os.path.join(ROOT, "ipamd/src/kube.rs")).read()
    assert "ANNOTATE_POD_IP" in src and "vpc.amazonaws.com/pod-ips" in src


def test_custom_networking_grants_events_and_cninodes_and_nothing_else(node):
    """AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG's own grant, applied only with the knob: create on
    events (the node's event about its ENIConfig) and get/create/patch on cninodes (the
    CustomNetworking feature), bound to aws-node's ServiceAccount."""
    rules = knob_grant(node, "rbac-custom-networking.yaml")
    assert rules == [
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": ["vpcresources.k8s.aws"], "resources": ["cninodes"], "verbs": ["get", "create", "patch"]},
    ]
    main = node["ClusterRole"]["rules"]
    assert all("events" not in r["resources"] and "cninodes" not in r["resources"] for r in main)
    src = open(os.path.join(ROOT, "ipamd/src/kube.rs")).read()
    assert "rbac-custom-networking.yaml" in src and '"cninodes"' in src


def test_cninode_crd_matches_the_vpc_resource_controllers():
    (crd,) = load("cninode-crd.yaml")
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "cninodes.vpcresources.k8s.aws"
    assert spec["group"] == "vpcresources.k8s.aws" and spec["scope"] == "Cluster"
    assert spec["names"]["kind"] == "CNINode" and spec["names"]["plural"] == "cninodes"
    (v,) = spec["versions"]
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    props = v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    item = props["features"]["items"]["properties"]
    assert "CustomNetworking" in item["name"]["enum"] and item["value"]["type"] == "string"
    assert props["tags"]["additionalProperties"] == {"type": "string"}


def test_eniconfig_crd_matches_upstream():
    (crd,) = load("eniconfig-crd.yaml")
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "eniconfigs.crd.k8s.amazonaws.com"
    assert spec["group"] == "crd.k8s.amazonaws.com" and spec["scope"] == "Cluster"
    assert spec["names"]["kind"] == "ENIConfig" and spec["names"]["plural"] == "eniconfigs"
    (v,) = spec["versions"]
    assert v["name"] == "v1alpha1" and v["served"] and v["storage"]
    props = v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert props["subnet"]["type"] == "string"
    assert props["securityGroups"] == {"type": "array", "items": {"type": "string"}}


def bin_targets():
    names = set()
    for toml in ["cni/Cargo.toml", "ipamd/Cargo.toml"]:
        text = open(os.path.join(ROOT, toml)).read()
        names |= set(re.findall(r'\[\[bin\]\]\s*name\s*=\s*"([^"]+)"', text))
        names |= set(re.findall(r'^name\s*=\s*"([^"]+)"', text, re.M)[:1])
    return names


def test_dockerfile_ships_the_binaries_the_manifest_runs(node):
    text = open(os.path.join(DEPLOY, "Dockerfile")).read()
    copied = set(re.findall(r"/src/target/release/([\w-]+)", text))
    assert copied == {"aws-cni", "egress-cni", "ipamd", "aws-vpc-cni"}
    assert copied <= bin_targets(), bin_targets()
    assert 'ENTRYPOINT ["/app/aws-vpc-cni"]' in text
    spec = node["DaemonSet"]["spec"]["template"]["spec"]
    used = {c["command"][0] for c in spec["containers"] + spec["initContainers"]}
    used |= {spec["containers"][0][p]["exec"]["command"][0] for p in ("livenessProbe", "readinessProbe")}
    assert used == {f"/app/{b}" for b in ("aws-vpc-cni", "ipamd")}
    # The entrypoint finds aws-cni, egress-cni (IPv6 mode) and ipamd next to itself in /app.
    assert "--bins" in text and "-p aws-cni" in text and "-p ipamd" in text


def image_of_build_script():
    """What deploy/build-image puts in the image: /app's files, entrypoint, environment."""
    text = open(os.path.join(DEPLOY, "build-image")).read()
    apps = set(re.search(r"for b in ([\w\s-]+); do\n\s+install -m 0755", text).group(1).split())
    entrypoint = re.search(r"--config.entrypoint (\S+)", text).group(1)
    env = dict(e.split("=", 1) for e in re.findall(r"--config.env (\S+)", text))
    return apps, entrypoint, env


def test_build_image_and_dockerfile_describe_the_same_image():
    docker = open(os.path.join(DEPLOY, "Dockerfile")).read()
    apps, entrypoint, env = image_of_build_script()
    assert apps == set(re.findall(r"/src/target/release/([\w-]+)", docker))
    assert f'ENTRYPOINT ["{entrypoint}"]' in docker
    # debian:bookworm-slim's PATH, which the Dockerfile's image inherits.
    assert env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    # Both install iptables (both back ends) and CA certificates from Debian bookworm.
    assert "iptables" in docker and "ca-certificates" in docker and "bookworm" in docker
    script = open(os.path.join(DEPLOY, "build-image")).read()
    assert "iptables" in script and "ca-certificates" in script and "bookworm" in script


def test_a_built_image_archive_has_what_the_dockerfile_describes():
    """Checks the archive deploy/build-image made, when there is one (scripts/test makes it)."""
    import glob
    import json
    import tarfile

    archives = sorted(glob.glob(os.path.join(DEPLOY, "..", ".build", "image", "aws-node-*.tar")))
    if not archives:
        pytest.skip("no image built (deploy/build-image)")
    apps, entrypoint, env = image_of_build_script()
    with tarfile.open(archives[0]) as t:
        index = json.load(t.extractfile("index.json"))
        blob = lambda d: t.extractfile("blobs/" + d.replace(":", "/"))  # noqa: E731
        manifest = json.load(blob(index["manifests"][0]["digest"]))
        config = json.load(blob(manifest["config"]["digest"]))
        assert config["config"]["Entrypoint"] == [entrypoint]
        assert dict(e.split("=", 1) for e in config["config"]["Env"]) == env
        layers = []
        for layer in manifest["layers"]:
            with tarfile.open(fileobj=blob(layer["digest"]), mode="r:*") as lt:
                layers.append({m.name.lstrip("./") for m in lt.getmembers()})
        # Debian's layer, then the binaries' own (a new build changes only that one).
        assert len(layers) == 2, [len(files) for files in layers]
        assert {f"app/{a}" for a in apps} == {f for f in layers[1] if f.startswith("app/")}
        assert not any(f.startswith("app/") for f in layers[0])
        files = layers[0] | layers[1]
        for alt in ("usr/sbin/iptables-nft", "usr/sbin/iptables-legacy"):
            assert alt in files, alt
