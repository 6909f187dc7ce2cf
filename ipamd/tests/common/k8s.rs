//! A real Kubernetes API server for the tests: kube-apiserver with the RBAC authorizer, on
//! its own etcd, both built from the Go module proxy by `tests/k8s/build` (run by
//! `scripts/test`). They listen on the loopback of the test's network namespace and are
//! killed, their data removed, on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

const ADMIN_TOKEN: &str = "test-admin-token";
pub const SERVER: &str = "https://127.0.0.1:6443";

/// The resource a CRD serves (its first version).
fn resource_of(crd: &CustomResourceDefinition) -> kube::api::ApiResource {
    let s = &crd.spec;
    let v = &s.versions[0].name;
    kube::api::ApiResource {
        group: s.group.clone(),
        version: v.clone(),
        api_version: format!("{}/{v}", s.group),
        kind: s.names.kind.clone(),
        plural: s.names.plural.clone(),
    }
}

pub struct K8s {
    pub dir: tempfile::TempDir,
    procs: Vec<Child>,
    pub admin: Client,
}

fn bin_dir() -> PathBuf {
    std::env::var_os("VPC_CNI_K8S_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.build/k8s/bin"))
}

fn spawn(dir: &Path, name: &str, args: &[&str]) -> Child {
    let bin = bin_dir().join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it with tests/k8s/build (scripts/test does)",
        bin.display()
    );
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"))
}

impl K8s {
    /// etcd and kube-apiserver on this namespace's loopback, ready, with an admin client.
    pub async fn start() -> K8s {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let key = d.join("sa.key");
        let ok = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(ok.success(), "openssl genrsa");
        std::fs::write(
            d.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin-uid,system:masters\n"),
        )
        .unwrap();
        let etcd = spawn(
            d,
            "etcd",
            &[
                "--data-dir",
                "etcd",
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "default=http://127.0.0.1:2380",
                "--log-level",
                "error",
            ],
        );
        let apiserver = spawn(
            d,
            "kube-apiserver",
            &[
                "--etcd-servers",
                "http://127.0.0.1:2379",
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--secure-port",
                "6443",
                "--cert-dir",
                "certs",
                "--service-cluster-ip-range",
                "10.96.0.0/16",
                "--service-account-issuer",
                "https://kubernetes.default.svc",
                "--service-account-key-file",
                "sa.key",
                "--service-account-signing-key-file",
                "sa.key",
                "--token-auth-file",
                "tokens.csv",
                "--authorization-mode",
                "RBAC",
            ],
        );
        let procs = vec![apiserver, etcd];
        let ca = d.join("certs/apiserver.crt");
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ca.exists() {
            assert!(
                Instant::now() < deadline,
                "kube-apiserver wrote no certificate"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let admin = client(&write_kubeconfig(d, "admin", ADMIN_TOKEN)).await;
        let me = K8s { dir, procs, admin };
        // Ready once its bootstrap has made kube-system (and the RBAC defaults).
        let ns: Api<Namespace> = Api::all(me.admin.clone());
        loop {
            if ns.get("kube-system").await.is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready in 60 s:\n{}",
                me.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        me
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kube-apiserver.log")).unwrap_or_default()
    }

    /// A kubeconfig for this server with a bearer token.
    pub fn kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        write_kubeconfig(self.dir.path(), name, token)
    }

    /// The Node object, as kubelet registers it.
    pub async fn register_node(&self, name: &str, unschedulable: bool) {
        let nodes: Api<Node> = Api::all(self.admin.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"unschedulable": unschedulable},
        }))
        .unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }

    /// Merge-patches the node's spec (what `kubectl cordon`/`uncordon` and the node
    /// controller's taints write).
    pub async fn patch_node_spec(&self, name: &str, spec: Value) {
        self.patch_node(name, json!({ "spec": spec })).await;
    }

    /// Merge-patches the node's metadata (labels, annotations).
    pub async fn patch_node_meta(&self, name: &str, meta: Value) {
        self.patch_node(name, json!({ "metadata": meta })).await;
    }

    async fn patch_node(&self, name: &str, patch: Value) {
        let nodes: Api<Node> = Api::all(self.admin.clone());
        nodes
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
    }

    /// Sets the node's `status.capacity.pods` (what kubelet reports for --max-pods).
    pub async fn set_node_capacity_pods(&self, name: &str, pods: u32) {
        let nodes: Api<Node> = Api::all(self.admin.clone());
        nodes
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"capacity": {"pods": pods.to_string()}}})),
            )
            .await
            .unwrap();
    }

    /// Creates the CRD of a manifest file and waits until the API serves it.
    pub async fn apply_crd(&self, manifest: &Path) {
        let text = std::fs::read_to_string(manifest).unwrap();
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&text).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        let api: Api<CustomResourceDefinition> = Api::all(self.admin.clone());
        api.create(&PostParams::default(), &crd).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = api.get(&name).await.unwrap();
            let established = c
                .status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .any(|c| c.type_ == "Established" && c.status == "True");
            let served: Api<DynamicObject> = Api::all_with(self.admin.clone(), &resource_of(&c));
            if established && served.list(&Default::default()).await.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "CRD {name} not served in 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node's CNINode as the API holds it (`vpcresources.k8s.aws`), if there is one.
    pub async fn cni_node(&self, name: &str) -> Option<Value> {
        let api: Api<DynamicObject> =
            Api::all_with(self.admin.clone(), &ipamd::kube::cni_node_resource());
        let o = api.get_opt(name).await.unwrap()?;
        Some(serde_json::to_value(o).unwrap())
    }

    /// Merge-patches the node's CNINode (what the VPC resource controller writes).
    pub async fn patch_cni_node(&self, name: &str, patch: Value) {
        let api: Api<DynamicObject> =
            Api::all_with(self.admin.clone(), &ipamd::kube::cni_node_resource());
        api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
    }

    /// The events about the node, as `kubectl describe node` finds them: (type, reason,
    /// message, reporting component).
    pub async fn node_events(&self, name: &str) -> Vec<(String, String, String, String)> {
        let api: Api<k8s_openapi::api::core::v1::Event> = Api::all(self.admin.clone());
        let lp = kube::api::ListParams::default().fields(&format!(
            "involvedObject.kind=Node,involvedObject.name={name},involvedObject.uid={name}"
        ));
        api.list(&lp)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default(),
                    e.source.and_then(|s| s.component).unwrap_or_default(),
                )
            })
            .collect()
    }

    pub fn eni_configs(&self) -> Api<DynamicObject> {
        Api::all_with(self.admin.clone(), &ipamd::kube::eni_config_resource())
    }

    /// Creates or replaces the ENIConfig `name` with this spec.
    pub async fn put_eni_config(&self, name: &str, spec: Value) {
        let api = self.eni_configs();
        let obj = json!({
            "apiVersion": "crd.k8s.amazonaws.com/v1alpha1",
            "kind": "ENIConfig",
            "metadata": {"name": name},
            "spec": spec,
        });
        api.patch(
            name,
            &PatchParams::apply("tests").force(),
            &Patch::Apply(obj),
        )
        .await
        .unwrap();
    }

    pub async fn delete_eni_config(&self, name: &str) {
        self.eni_configs()
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }

    /// A pod object in `default` (never scheduled: the API holds it as a kubelet would see it).
    pub async fn create_pod(&self, name: &str) {
        // Admission wants the namespace's default account (no controller-manager makes it here).
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), "default");
        if sas.get_opt("default").await.unwrap().is_none() {
            let sa = serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
            sas.create(&PostParams::default(), &sa).await.unwrap();
        }
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.admin.clone(), "default");
        let pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "lab.local/pause:1"}]},
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
    }

    /// The pod's annotation `key`, if set.
    pub async fn pod_annotation(&self, name: &str, key: &str) -> Option<String> {
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.admin.clone(), "default");
        let p = pods.get(name).await.unwrap();
        p.metadata.annotations.and_then(|a| a.get(key).cloned())
    }

    /// Creates the ServiceAccount, ClusterRole and ClusterRoleBinding of a manifest
    /// file as they are written there; returns the account's (namespace, name).
    pub async fn apply_rbac(&self, manifest: &Path) -> (String, String) {
        self.create_rbac(manifest)
            .await
            .expect("a ServiceAccount in the manifest")
    }

    async fn create_rbac(&self, manifest: &Path) -> Option<(String, String)> {
        let text = std::fs::read_to_string(manifest).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
        let pp = PostParams::default();
        let mut account = None;
        for doc in docs {
            match doc["kind"].as_str().unwrap_or_default() {
                "ServiceAccount" => {
                    let sa: ServiceAccount = serde_json::from_value(doc).unwrap();
                    let ns = sa.metadata.namespace.clone().unwrap();
                    let name = sa.metadata.name.clone().unwrap();
                    Api::<ServiceAccount>::namespaced(self.admin.clone(), &ns)
                        .create(&pp, &sa)
                        .await
                        .unwrap();
                    account = Some((ns, name));
                }
                "ClusterRole" => {
                    let r: ClusterRole = serde_json::from_value(doc).unwrap();
                    Api::<ClusterRole>::all(self.admin.clone())
                        .create(&pp, &r)
                        .await
                        .unwrap();
                }
                "ClusterRoleBinding" => {
                    let b: ClusterRoleBinding = serde_json::from_value(doc).unwrap();
                    Api::<ClusterRoleBinding>::all(self.admin.clone())
                        .create(&pp, &b)
                        .await
                        .unwrap();
                }
                _ => {}
            }
        }
        account
    }

    /// Creates the ClusterRoles and ClusterRoleBindings of a manifest file that grants an
    /// existing account more (a knob's own RBAC file).
    pub async fn apply_rbac_extra(&self, manifest: &Path) {
        assert_eq!(
            self.create_rbac(manifest).await,
            None,
            "an extra grant makes no account"
        );
    }

    /// A token of the service account (TokenRequest, as the kubelet mounts one).
    pub async fn token(&self, namespace: &str, account: &str) -> String {
        let api: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), namespace);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec!["https://kubernetes.default.svc".into()],
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let out = api
            .create_token_request(account, &PostParams::default(), &req)
            .await
            .unwrap();
        out.status.unwrap().token
    }
}

fn write_kubeconfig(dir: &Path, name: &str, token: &str) -> PathBuf {
    let path = dir.join(format!("{name}.kubeconfig"));
    let ca = dir.join("certs/apiserver.crt");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {SERVER}\n    certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: test\n    user: {name}\ncurrent-context: {name}\n",
            ca.display()
        ),
    )
    .unwrap();
    path
}

async fn client(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(cfg).unwrap()
}

impl Drop for K8s {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}
