//! The Kubernetes node agent (`[sidecar.node]`, docs/kubernetes.md) against a real containerd.
//!
//! Each test runs in its own network namespace (`in_fresh_netns`) and starts there: the HTTPS
//! upstream posing as api.openai.com / paste.rs at 10.77.0.2:443 (on the namespace's `lo`), a
//! bridge `firma-cni0` with 10.88.0.1/16 (the pods' gateway and the sidecar's
//! `redirect_address`), the real `firma sidecar` in transparent mode with the node agent on,
//! and a real containerd (Debian's, CRI plugin, cgroupfs driver, root and state in a temp dir,
//! the CNI `bridge` plugin on `firma-cni0`, the `firma sidecar oci-hook` in its base runtime
//! spec, `pod_annotations = ["firma.dev/*"]`). The image is busybox-static + curl packed with
//! umoci and imported with `ctr`. Pods are created through the CRI gRPC API exactly as the
//! kubelet does (RunPodSandbox with `cgroup_parent = /kubepods/besteffort/pod<uid>`, then
//! CreateContainer + StartContainer at once); every pod has its own network namespace made by
//! containerd + CNI, whose only way out is the bridge into the test's namespace.
//!
//! Needs root, BPF, cgroup2, `unshare`, and `containerd`, `ctr`, `runc`, `umoci`, the CNI
//! plugins and curl (`SKIP` otherwise; `FIRMA_NO_SKIP=1` makes that a failure).

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use firma_common::maps::{MAP_BINDINGS, WorkloadBinding};
use firma_common::proto::cri;
use firma_sidecar::control::{Request, StatusReport};
use firma_sidecar::ebpf::LINKS_PER_CGROUP;
use firma_testing::config::Mode;
use firma_testing::kernel::{DST_V4, TestPins, in_fresh_netns, sh};
use firma_testing::sidecar::{Deployment, Settings, Sidecar};
use firma_testing::upstream::Upstream;
use firma_testing::{assert_eventually, firma_bin, free_dual_port};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = "tenant-acme";
const SESSION: &str = "s1";
const CANARY: &str = "sk-canary-k8s-7f3e";
const CLIENT_KEY: &str = "Bearer agent-own-key";
const IMAGE: &str = "firma.test/app:1";
const GATEWAY: &str = "10.88.0.1";
const BRIDGE: &str = "firma-cni0";
const CREDENTIAL: &str = "[[sidecar.credentials]]\nhost = \"api.openai.com\"\nmode = \"basic\"\nheader = \"Authorization\"\nprefix = \"Bearer \"\nvalue_from_env = \"FIRMA_TEST_OPENAI_KEY\"\n";

/// `Some(reason)` when a runtime part is missing.
fn runtime_missing() -> Option<String> {
    for tool in ["containerd", "ctr", "runc", "umoci", "curl", "busybox"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).is_file();
        if !found {
            return Some(format!(
                "`{tool}` not installed (apt-get install containerd runc umoci containernetworking-plugins busybox-static curl)"
            ));
        }
    }
    if !Path::new("/usr/lib/cni/bridge").is_file() {
        return Some("CNI plugins missing (apt-get install containernetworking-plugins)".into());
    }
    None
}

/// Runs the test body in a fresh network namespace, or SKIPs.
fn enter(name: &str) -> bool {
    if std::env::var_os("FIRMA_TEST_NETNS").is_none()
        && let Some(why) = runtime_missing()
    {
        firma_testing::skip(name, &why);
        return false;
    }
    in_fresh_netns(name)
}

/// The OCI image: busybox-static as /bin/sh and friends, curl with its libraries, packed with
/// umoci into an OCI layout and written as a tar `ctr images import` takes.
fn build_image(dir: &Path) -> PathBuf {
    let layout = dir.join("img");
    let bundle = dir.join("bundle");
    let run = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let l = layout.to_str().unwrap();
    run(&["umoci", "init", "--layout", l]);
    run(&["umoci", "new", "--image", &format!("{l}:1")]);
    run(&[
        "umoci",
        "unpack",
        "--image",
        &format!("{l}:1"),
        bundle.to_str().unwrap(),
    ]);
    let rootfs = bundle.join("rootfs");
    let busybox = sh(&["sh", "-c", "command -v busybox"]);
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy(busybox.trim(), rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "sleep", "cat", "echo", "true"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let curl = sh(&["sh", "-c", "command -v curl"]).trim().to_string();
    let ldd = sh(&["ldd", &curl]);
    let files = std::iter::once(curl.clone()).chain(
        ldd.split_whitespace()
            .filter(|w| w.starts_with('/'))
            .map(str::to_string),
    );
    for f in files {
        let to = rootfs.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&f, &to).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
    run(&[
        "umoci",
        "repack",
        "--image",
        &format!("{l}:1"),
        bundle.to_str().unwrap(),
    ]);
    run(&[
        "umoci",
        "config",
        "--image",
        &format!("{l}:1"),
        "--config.cmd",
        "/bin/sleep",
        "--config.cmd",
        "100000",
    ]);
    let tar = dir.join("img.tar");
    run(&["tar", "-C", l, "-cf", tar.to_str().unwrap(), "."]);
    tar
}

/// A real containerd with its CRI plugin, all state under `dir`.
struct Containerd {
    child: Child,
    sock: PathBuf,
    dir: PathBuf,
}

impl Containerd {
    fn start(dir: &Path, control_socket: &Path, image: &Path) -> Self {
        let d = dir.display();
        std::fs::create_dir_all(dir.join("cni")).unwrap();
        std::fs::write(
            dir.join("cni/10-firma.conflist"),
            format!(
                r#"{{"cniVersion":"0.4.0","name":"firma-test","plugins":[{{"type":"bridge","bridge":"{BRIDGE}","isGateway":true,"ipMasq":false,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.88.0.0/16","gateway":"{GATEWAY}"}}]],"routes":[{{"dst":"0.0.0.0/0"}}],"dataDir":"{d}/ipam"}}}}]}}"#
            ),
        )
        .unwrap();
        // The runtime's default spec plus Firma's createRuntime hook, as a node would install it.
        let spec = sh(&["ctr", "oci", "spec"]);
        let mut spec: Value = serde_json::from_str(&spec).expect("ctr oci spec");
        spec["hooks"] = serde_json::json!({"createRuntime": [{
            "path": firma_bin(),
            "args": ["firma", "sidecar", "oci-hook", "--control-socket", control_socket],
            "timeout": 30
        }]});
        std::fs::write(dir.join("base-spec.json"), spec.to_string()).unwrap();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{d}/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{IMAGE}"
  disable_apparmor = true
  # Sandboxes ask for oom_score_adj -998, which this test's own process may not be allowed to
  # set (EACCES in runc's nsexec): keep them at or above containerd's.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      base_runtime_spec = "{d}/base-spec.json"
      pod_annotations = ["firma.dev/*"]
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#
        );
        std::fs::write(dir.join("containerd.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("-c")
            .arg(dir.join("containerd.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd");
        let this = Self {
            child,
            sock: dir.join("containerd.sock"),
            dir: dir.to_path_buf(),
        };
        assert_eventually(Duration::from_secs(30), "containerd serving", || {
            this.sock.exists()
        });
        let out = Command::new("ctr")
            .args([
                "-a",
                this.sock.to_str().unwrap(),
                "-n",
                "k8s.io",
                "images",
                "import",
            ])
            .args(["--snapshotter", "native", "--base-name", "firma.test/app"])
            .arg(image)
            .output()
            .expect("ctr");
        assert!(
            out.status.success(),
            "ctr import: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        this
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// One pod as the kubelet would describe it.
#[derive(Clone)]
struct Pod {
    uid: String,
    id: String,
    config: cri::PodSandboxConfig,
}

/// The whole node: upstream, sidecar with the node agent, containerd, CRI client.
struct Node {
    rt: tokio::runtime::Runtime,
    cri: firma_sidecar::node::cri::Client,
    up: Upstream,
    d: Deployment,
    sc: Option<Sidecar>,
    hosts: PathBuf,
    pins: TestPins,
    control: PathBuf,
    pods: Vec<Pod>,
    // Dropped last: the sandboxes are removed first (Drop below).
    containerd: Containerd,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        sh(&["ip", "link", "add", BRIDGE, "type", "bridge"]);
        sh(&["ip", "addr", "add", &format!("{GATEWAY}/16"), "dev", BRIDGE]);
        sh(&["ip", "link", "set", BRIDGE, "up"]);
        let dir = tempfile::tempdir().unwrap();
        let up = Upstream::start_at(
            dir.path(),
            &["api.openai.com", "paste.rs"],
            format!("{DST_V4}:443").parse().unwrap(),
        );
        let pins = TestPins::new();
        let mut settings = Settings {
            upstream_hosts: Vec::new(),
            extra: CREDENTIAL.into(),
            ..Settings::default()
        };
        let d = Deployment::new(Some(&up), &settings);
        let control = d.root().join("run/sidecar.sock");
        settings.mode = Mode::Transparent {
            port: free_dual_port(),
            pin_dir: pins.dir.clone(),
            control_socket: control.clone(),
            allow_ephemeral_pins: None,
        };
        d.write(Some(&up), &settings);
        // Pods have their own network namespace: tagged connects go to the bridge address.
        let mut text = std::fs::read_to_string(&d.config).unwrap().replace(
            "[sidecar.interceptor.transparent]\n",
            &format!(
                "[sidecar.interceptor.transparent]\nredirect_address = \"{GATEWAY}\"\nredirect_dns = false\n"
            ),
        );
        text.push_str(&format!(
            "\n[sidecar.node]\ncri_socket = \"{}/containerd/containerd.sock\"\nresync_interval_ms = 100\n",
            dir.path().display()
        ));
        std::fs::write(&d.config, text).unwrap();
        let hosts = d.root().join("hosts");
        std::fs::write(
            &hosts,
            format!("127.0.0.1 localhost\n{DST_V4} api.openai.com paste.rs\n"),
        )
        .unwrap();
        let image = build_image(dir.path());
        let containerd = Containerd::start(&dir.path().join("containerd"), &control, &image);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let cri = rt
            .block_on(firma_sidecar::node::cri::connect(&containerd.sock))
            .unwrap_or_else(|e| panic!("{e}\n{}", containerd.log()));
        let mut node = Self {
            rt,
            cri,
            up,
            d,
            sc: None,
            hosts,
            pins,
            control,
            pods: Vec::new(),
            containerd,
            dir,
        };
        node.start_sidecar();
        node
    }

    fn start_sidecar(&mut self) {
        let sc = self
            .d
            .start_with_hosts(&[("FIRMA_TEST_OPENAI_KEY", CANARY)], &self.hosts);
        self.sc = Some(sc);
    }

    fn kill_sidecar(&mut self) {
        let mut sc = self.sc.take().expect("sidecar running");
        sc.child.kill().unwrap(); // SIGKILL
        let _ = sc.child.wait();
    }

    fn log(&self) -> String {
        format!(
            "--- sidecar ---\n{}\n--- containerd (tail) ---\n{}",
            self.sc.as_ref().map(|s| s.log_text()).unwrap_or_default(),
            self.containerd
                .log()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    fn status(&self) -> StatusReport {
        let r = firma_sidecar::control::request(&self.control, &Request::Status)
            .expect("control socket");
        serde_json::from_value(r.result.expect("status result")).expect("status shape")
    }

    /// The agent ids attached per pod UID (pod-level cgroups only), with their link counts.
    fn attached(&self) -> HashMap<String, (String, usize)> {
        self.status()
            .workloads
            .into_iter()
            .filter_map(|w| {
                let uid = firma_sidecar::ebpf::cgroup::pod_uid_of(&w.cgroup_path)?;
                Some((uid, (w.agent_id, w.links)))
            })
            .collect()
    }

    /// RunPodSandbox with the kubelet's shape: cgroupfs parent under kubepods/besteffort.
    fn run_pod(&mut self, name: &str, annotations: &[(&str, &str)]) -> Pod {
        let uid = uuid_like();
        let logs = self.dir.path().join("logs").join(&uid);
        std::fs::create_dir_all(&logs).unwrap();
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: logs.display().to_string(),
            labels: HashMap::from([("app".to_string(), name.to_string())]),
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: format!("/kubepods/besteffort/pod{uid}"),
                security_context: None,
            }),
        };
        let id = self
            .rt
            .block_on(self.cri.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            }))
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.log()))
            .into_inner()
            .pod_sandbox_id;
        let pod = Pod { uid, id, config };
        self.pods.push(pod.clone());
        pod
    }

    /// CreateContainer + StartContainer back to back (as the kubelet does); the command is
    /// the container's first process. `Err` carries the runtime's message.
    fn start_container(
        &mut self,
        pod: &Pod,
        name: &str,
        command: &[&str],
    ) -> Result<String, String> {
        let mounts = vec![
            cri::Mount {
                container_path: "/firma-ca.crt".into(),
                host_path: self.d.ca_cert().display().to_string(),
                readonly: true,
            },
            cri::Mount {
                container_path: "/upstream-ca.crt".into(),
                host_path: self.up.ca_path.display().to_string(),
                readonly: true,
            },
        ];
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: IMAGE.into(),
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            mounts,
            log_path: format!("{name}.log"),
            ..Default::default()
        };
        let id = self
            .rt
            .block_on(self.cri.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            }))
            .map_err(|e| format!("CreateContainer: {e}"))?
            .into_inner()
            .container_id;
        self.rt
            .block_on(self.cri.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }))
            .map_err(|e| format!("StartContainer: {}", e.message()))?;
        Ok(id)
    }

    /// Waits for the container to exit and returns its stdout (CRI log format stripped).
    fn output(&mut self, pod: &Pod, name: &str, id: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = self
                .rt
                .block_on(self.cri.container_status(cri::ContainerStatusRequest {
                    container_id: id.into(),
                    verbose: false,
                }))
                .expect("ContainerStatus")
                .into_inner()
                .status
                .expect("status");
            if st.state == cri::ContainerState::ContainerExited as i32 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not exit\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let path = Path::new(&pod.config.log_directory).join(format!("{name}.log"));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Runs `curl ARGS` as the first process of a new container in `pod`; its output.
    fn curl(&mut self, pod: &Pod, name: &str, args: &[&str]) -> String {
        let mut cmd = vec![
            "/usr/bin/curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\nHTTP %{http_code}\n",
        ];
        cmd.extend_from_slice(args);
        let id = self
            .start_container(pod, name, &cmd)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
        self.output(pod, name, &id)
    }

    fn remove_pod(&mut self, pod: &Pod) {
        let id = pod.id.clone();
        self.rt
            .block_on(self.cri.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.clone(),
            }))
            .expect("StopPodSandbox");
        self.rt
            .block_on(
                self.cri
                    .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id }),
            )
            .expect("RemovePodSandbox");
        self.pods.retain(|p| p.id != pod.id);
    }

    /// The kubelet removes the pod cgroup (in every hierarchy) after the sandbox.
    fn remove_pod_cgroups(uid: &str) {
        let rel = format!("kubepods/besteffort/pod{uid}");
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir(e.path().join(&rel));
            }
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&rel));
    }

    /// Pinned bindings (cgroup id -> identity) in the map the programs read.
    fn pinned_bindings(&self) -> usize {
        let data = MapData::from_pin(self.pins.dir.join("maps").join(MAP_BINDINGS))
            .expect("pinned bindings map");
        let map: BpfHashMap<MapData, u64, WorkloadBinding> =
            BpfHashMap::try_from(Map::HashMap(data)).expect("bindings map type");
        map.keys().filter_map(Result::ok).count()
    }

    /// Pinned link directories (one per attached cgroup).
    fn pinned_link_dirs(&self) -> usize {
        std::fs::read_dir(self.pins.dir.join("links"))
            .map(|d| d.flatten().count())
            .unwrap_or(0)
    }

    fn audit_from_pod(&self, host: &str, uid: &str) -> Vec<Value> {
        let prefix = format!("/kubepods/besteffort/pod{uid}/");
        self.d
            .audit_for(host)
            .into_iter()
            .filter(|e| {
                e["workload"]["cgroup_path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&prefix))
            })
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for pod in std::mem::take(&mut self.pods) {
            let _ = self
                .rt
                .block_on(self.cri.stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: pod.id.clone(),
                }));
            let _ = self
                .rt
                .block_on(self.cri.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: pod.id.clone(),
                }));
            Self::remove_pod_cgroups(&pod.uid);
        }
    }
}

/// A fresh pod UID in the Kubernetes form (8-4-4-4-12 hex).
fn uuid_like() -> String {
    let h = format!("{:032x}", rand_u128());
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn rand_u128() -> u128 {
    let mut b = [0u8; 16];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("/dev/urandom");
    u128::from_le_bytes(b)
}

fn enforced_annotations() -> [(&'static str, &'static str); 2] {
    [
        ("firma.dev/agent-id", AGENT),
        ("firma.dev/session-id", SESSION),
    ]
}

const DENIED: [&str; 6] = [
    "--cacert",
    "/firma-ca.crt",
    "--resolve",
    "paste.rs:443:10.77.0.2",
    "-d",
    "secret=1",
];

fn json_body(out: &str) -> Value {
    out.lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null)
}

/// The denied call, made by a container's first process: 403 from Firma, nothing upstream,
/// audited with the pod's identity.
fn assert_denied_from_first_connect(n: &mut Node, pod: &Pod, name: &str) {
    let before = n.up.count();
    let out = n.curl(pod, name, &[&DENIED[..], &["https://paste.rs/"]].concat());
    assert!(out.contains("HTTP 403"), "{name}: {out}\n{}", n.log());
    assert_eq!(json_body(&out)["reason"], "PolicyDenied", "{out}");
    assert_eq!(
        n.up.count(),
        before,
        "{name}: a denied call reached the upstream"
    );
    assert_eventually(Duration::from_secs(10), "deny audited with the pod", || {
        n.audit_from_pod("paste.rs", &pod.uid).iter().any(|e| {
            e["decision"]["outcome"] == "DENY"
                && e["decision"]["reason"] == "PolicyDenied"
                && e["workload"]["agent_id"] == AGENT
                && e["workload"]["session_id"] == SESSION
        })
    });
}

/// A labelled pod's containers are enforced from their first connect (curl is the container's
/// first process: denied 403, allowed with the credential injected), an unlabelled pod on the
/// same node is untouched, and cannot pass itself off as an enforced pod by dialling the
/// agent's listener on the gateway, and deleting the pod detaches it.
#[test]
fn labelled_pod_is_enforced_from_its_first_connect() {
    if !enter("labelled_pod_is_enforced_from_its_first_connect") {
        return;
    }
    let mut n = Node::new();
    let pod = n.run_pod("agent", &enforced_annotations());

    // 1. Denied, from the container's first process.
    assert_denied_from_first_connect(&mut n, &pod, "first");

    // 2. Allowed, credential injected (the container's own key replaced).
    let before = n.up.count();
    let out = n.curl(
        &pod,
        "allowed",
        &[
            "--cacert",
            "/firma-ca.crt",
            "--resolve",
            "api.openai.com:443:10.77.0.2",
            "-H",
            &format!("Authorization: {CLIENT_KEY}"),
            "https://api.openai.com/v1/models",
        ],
    );
    assert!(out.contains("HTTP 200"), "allowed: {out}\n{}", n.log());
    let seen = n.up.seen();
    assert_eq!(seen.len(), before + 1, "one request upstream");
    assert_eq!(
        seen.last().unwrap().headers["authorization"],
        format!("Bearer {CANARY}"),
        "the injected credential, not the container's own"
    );
    assert_eventually(
        Duration::from_secs(10),
        "allow audited with the pod",
        || {
            n.audit_from_pod("api.openai.com", &pod.uid)
                .iter()
                .any(|e| {
                    e["decision"]["outcome"] == "ALLOW"
                        && e["connector"]["credential_injected"] == true
                        && e["workload"]["agent_id"] == AGENT
                        && e["capability"]["agent_id"] == AGENT
                })
        },
    );

    // 3. An unlabelled pod on the same node: direct to the upstream, its own key, no audit.
    let plain = n.run_pod("plain", &[]);
    let audited = n.d.audit().len();
    let before = n.up.count();
    let out = n.curl(
        &plain,
        "direct",
        &[
            "--cacert",
            "/upstream-ca.crt",
            "--resolve",
            "api.openai.com:443:10.77.0.2",
            "-H",
            &format!("Authorization: {CLIENT_KEY}"),
            "https://api.openai.com/v1/models",
        ],
    );
    assert!(out.contains("HTTP 200"), "unlabelled: {out}\n{}", n.log());
    assert_eq!(n.up.count(), before + 1);
    assert_eq!(
        n.up.seen().last().unwrap().headers["authorization"],
        CLIENT_KEY
    );
    assert_eq!(n.d.audit().len(), audited, "the unlabelled pod was audited");
    assert!(
        !n.attached().contains_key(&plain.uid),
        "the unlabelled pod was attached"
    );

    // 3b. Hostile: the unlabelled pod dials the agent's listener on the gateway itself, naming
    //     the credential's host, hoping to be served as an enforced pod (and injected). No
    //     redirect record: closed, audited as such, nothing upstream.
    let port = n.status().port;
    let before = n.up.count();
    let out = n.curl(
        &plain,
        "impostor",
        &[
            "-k",
            "--resolve",
            &format!("api.openai.com:{port}:{GATEWAY}"),
            &format!("https://api.openai.com:{port}/v1/models"),
        ],
    );
    assert!(!out.contains("HTTP 200"), "impostor served: {out}");
    assert_eq!(n.up.count(), before, "the impostor reached the upstream");
    assert_eventually(Duration::from_secs(10), "impostor audited", || {
        n.d.audit().iter().any(|e| {
            e["decision"]["outcome"] == "DENY"
                && e["decision"]["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("without a redirect record"))
        })
    });

    // 4. Deleting the labelled pod detaches it (before its cgroup is even removed).
    assert_eq!(
        n.attached().get(&pod.uid).map(|a| a.1),
        Some(LINKS_PER_CGROUP)
    );
    n.remove_pod(&pod);
    assert_eventually(Duration::from_secs(10), "pod detached", || {
        !n.attached().contains_key(&pod.uid)
    });
    Node::remove_pod_cgroups(&pod.uid);
    n.remove_pod(&plain);
    Node::remove_pod_cgroups(&plain.uid);
    assert_eventually(Duration::from_secs(10), "no pins left", || {
        n.pinned_link_dirs() == 0 && n.pinned_bindings() == 0
    });
}

/// kill -9 the agent: the pod stays enforced (a process in its cgroup is refused, never
/// direct), an app container of an enforced pod cannot start meanwhile (the hook fails
/// closed), a pod created meanwhile is attached at restart and enforced from its first connect,
/// a pod deleted meanwhile is detached.
#[test]
fn agent_kill_9_keeps_enforcement_and_resyncs() {
    if !enter("agent_kill_9_keeps_enforcement_and_resyncs") {
        return;
    }
    let mut n = Node::new();
    let kept = n.run_pod("kept", &enforced_annotations());
    let gone = n.run_pod("gone", &enforced_annotations());
    assert_eventually(Duration::from_secs(10), "both pods attached", || {
        let a = n.attached();
        a.contains_key(&kept.uid) && a.contains_key(&gone.uid)
    });

    n.kill_sidecar();
    // A process in the kept pod's cgroup (a child cgroup, like a container) is still
    // redirected: to the dead listener, so refused; the upstream sees nothing.
    let probe = firma_testing::kernel::TestCgroup::new(
        firma_sidecar::ebpf::Cgroup2::discover()
            .unwrap()
            .mount()
            .join(format!("kubepods/besteffort/pod{}/firma-probe", kept.uid)),
    )
    .expect("probe cgroup");
    let before = n.up.count();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec curl -sS --max-time 5 -k --resolve api.openai.com:443:{DST_V4} https://api.openai.com/v1/models",
            probe.dir.display()
        ))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a connect from the pod went through while the agent was dead"
    );
    assert_eq!(n.up.count(), before, "the upstream was reached directly");
    drop(probe);
    // The hook fails closed: no app container of an enforced pod starts without the agent.
    let refused = n.start_container(&kept, "while-down", &["/bin/true"]);
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("fail closed")),
        "{refused:?}"
    );
    // Meanwhile: one pod created (its sandbox needs no agent), one deleted.
    let late = n.run_pod("late", &enforced_annotations());
    n.remove_pod(&gone);

    n.start_sidecar();
    assert_eventually(Duration::from_secs(15), "resynced after restart", || {
        let a = n.attached();
        a.get(&kept.uid).map(|x| x.1) == Some(LINKS_PER_CGROUP)
            && a.get(&late.uid).map(|x| x.1) == Some(LINKS_PER_CGROUP)
            && !a.contains_key(&gone.uid)
    });
    Node::remove_pod_cgroups(&gone.uid);
    assert!(
        n.sc.as_ref()
            .unwrap()
            .log_text()
            .contains("re-adopted attached workload"),
        "{}",
        n.log()
    );
    assert_denied_from_first_connect(&mut n, &late, "late-first");
    assert_denied_from_first_connect(&mut n, &kept, "kept-after");
}

/// Pod create/delete cycles (`FIRMA_K8S_CYCLES`, default 200; 1,000 by hand: about 1 s each): each pod attached by the agent
/// and detached when deleted; afterwards no pinned link, no binding, no tracked connection.
#[test]
fn pod_cycles_leak_no_pins_or_map_entries() {
    if !enter("pod_cycles_leak_no_pins_or_map_entries") {
        return;
    }
    let cycles: usize = std::env::var("FIRMA_K8S_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut n = Node::new();
    let started = Instant::now();
    for i in 0..cycles {
        let pod = n.run_pod(&format!("cycle-{i}"), &enforced_annotations());
        assert_eventually(Duration::from_secs(10), "cycle pod attached", || {
            n.attached().get(&pod.uid).map(|a| a.1) == Some(LINKS_PER_CGROUP)
        });
        n.remove_pod(&pod);
        assert_eventually(Duration::from_secs(10), "cycle pod detached", || {
            !n.attached().contains_key(&pod.uid)
        });
        Node::remove_pod_cgroups(&pod.uid);
    }
    eprintln!(
        "{cycles} pod create/attach/delete/detach cycles in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let st = n.status();
    assert!(st.workloads.is_empty(), "{:?}", st.workloads);
    assert_eq!((st.tracked_by_cookie, st.tracked_by_peer), (0, 0));
    assert_eq!(n.pinned_link_dirs(), 0, "pinned link directories left");
    assert_eq!(n.pinned_bindings(), 0, "bindings left in the pinned map");
    assert!(n.sc.as_mut().unwrap().alive());
}
