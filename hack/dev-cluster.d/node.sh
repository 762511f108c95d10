# shellcheck shell=bash
# The dev cluster's real node: containerd and runc (Debian packages) and a
# kubelet built from the pinned Kubernetes module, beside the kwok nodes.
# Sourced by hack/dev-cluster; uses its state dir, pki, logs and helpers.
#
# - Pods get network namespaces of their own on a bridge (CNI bridge and
#   host-local, from Debian's containernetworking-plugins): $node_bridge with
#   $node_ip/24 on the host. A pod reaches a server on the host at $node_ip
#   (tests bind their Prefect server there), never at 127.0.0.1. The kubelet
#   listens on $node_ip only; the API server reaches it there (logs, exec).
# - Pods reach the API server as in any cluster, at the `kubernetes` Service
#   ($api_service_ip:443): one DNAT rule (chain $nat_chain) sends that address,
#   from the bridge only, to the API server on 127.0.0.1. No kube-proxy; no
#   other Service works.
# - Tainted $real_node_taint: only pods that tolerate it land there.
#   It advertises $node_gpus fake nvidia.com/gpu in its status, the documented
#   way to advertise an extended resource without a device plugin.
# - Images are never pulled (no registry is reachable): tests import them
#   with `ctr images import`; the sandbox image is a small Go program
#   (dev-cluster.d/pause) built here.
# - The machine this runs on may lack CAP_SYS_RESOURCE, so nothing may lower
#   oom_score_adj below 0: containerd clamps the kubelet's scores
#   (restrict_oom_score_adj); without it every pod sandbox fails to start.
# PGW_DEV_CLUSTER_NODE=0 leaves the node out.

node_dir=$state/node
# containerd's images, snapshots and container state: on a path every user may
# traverse (overlayfs checks a container user's access to each layer's path,
# and the state dir usually sits in a 0700 home).
node_data=${PGW_DEV_NODE_DATA:-/var/lib/prefect-gpu-workers/dev-node}
node_name=pgw-dev-node
node_bridge=pgw-dev0
node_ip=10.244.0.1
node_subnet=10.244.0.0/24
node_gpus=2
containerd_sock=$node_dir/containerd.sock
real_node_taint=prefect-gpu-workers.dev/real-node=true:NoSchedule
real_node_label=prefect-gpu-workers.dev/dev-cluster=real-node
pause_ref=localhost/pgw-dev/pause
api_service_ip=10.96.0.1 # the first address of --service-cluster-ip-range
nat_chain=PGW-DEV-NODE

# node_unsupported: why this machine cannot run the real node (empty: it can).
node_unsupported() {
  [ "${PGW_DEV_CLUSTER_NODE:-1}" != 0 ] || { echo "PGW_DEV_CLUSTER_NODE=0"; return; }
  [ "$(id -u)" = 0 ] || { echo "not root"; return; }
  local cmd
  for cmd in containerd containerd-shim-runc-v2 runc ctr buildah ip iptables; do
    command -v "$cmd" >/dev/null || { echo "$cmd not found"; return; }
  done
  [ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] ||
    { echo "CNI plugins not found in /usr/lib/cni"; return; }
  true
}
node_install_hint="apt-get install containerd runc containernetworking-plugins buildah iproute2 iptables (as root)"

ctr_node() { ctr --address "$containerd_sock" --namespace k8s.io "$@"; }

# The pause image, built once per source and Go version into the tools cache.
ensure_pause_image() {
  local src=$conf_dir/pause key out
  key=$(cat "$src/main.go" "$src/go.mod" <(go version) | sha256sum | cut -c1-12)
  out=${bin%/bin}/pause-$key
  if [ ! -s "$out/pause.oci.tar" ]; then
    log "building the sandbox (pause) image"
    mkdir -p "$out"
    (cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/pause" .)
    local bah=(buildah --root "$out/buildah" --runroot "$out/buildah-run" --storage-driver vfs) c
    c=$("${bah[@]}" from scratch)
    "${bah[@]}" copy "$c" "$out/pause" /pause >/dev/null
    "${bah[@]}" config --entrypoint '["/pause"]' "$c"
    "${bah[@]}" commit -q "$c" "$pause_ref:$key" >/dev/null
    "${bah[@]}" push -q "$pause_ref:$key" "oci-archive:$out/pause.oci.tar:$pause_ref:$key"
    "${bah[@]}" rm -a >/dev/null
    rm -rf "$out/buildah" "$out/buildah-run"
  fi
  pause_archive=$out/pause.oci.tar
  pause_tag=$pause_ref:$key
}

ensure_bridge() {
  ip link show "$node_bridge" >/dev/null 2>&1 || ip link add "$node_bridge" type bridge
  ip addr show dev "$node_bridge" | grep -qF " $node_ip/24" ||
    ip addr add "$node_ip/24" dev "$node_bridge"
  ip link set "$node_bridge" up
  # The API server listens on loopback: let the bridge's DNAT reach it there.
  echo 1 >"/proc/sys/net/ipv4/conf/$node_bridge/route_localnet"
  iptables -t nat -N "$nat_chain" 2>/dev/null || iptables -t nat -F "$nat_chain"
  iptables -t nat -C PREROUTING -i "$node_bridge" -j "$nat_chain" 2>/dev/null ||
    iptables -t nat -A PREROUTING -i "$node_bridge" -j "$nat_chain"
  iptables -t nat -A "$nat_chain" -d "$api_service_ip/32" -p tcp --dport 443 \
    -j DNAT --to-destination "127.0.0.1:$APISERVER_PORT"
}

write_node_config() {
  mkdir -p "$node_dir"/{cni,kubelet,pod-logs}
  (umask 022 && mkdir -p "$node_data") # every level traversable (see node_data)
  cat >"$node_dir/containerd.toml" <<EOF
version = 2
root = "$node_data/containerd"
state = "$node_data/containerd-state"
[grpc]
  address = "$containerd_sock"
[ttrpc]
  address = "$containerd_sock.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_tag"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$node_data/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node_dir/cni"
EOF
  cat >"$node_dir/cni/10-pgw-dev.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "pgw-dev",
  "plugins": [{
    "type": "bridge", "bridge": "$node_bridge", "isGateway": true,
    "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": "$node_dir/ipam",
             "ranges": [[{"subnet": "$node_subnet", "gateway": "$node_ip"}]],
             "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
EOF
  # Eviction off and image GC off: the disk is shared with everything else
  # here, and a pod evicted for a full disk would fail a test for no reason.
  cat >"$node_dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$containerd_sock
cgroupDriver: cgroupfs
# Its own cgroup tree: a kubelet treats pod cgroups it does not know as
# orphans and kills their processes, so two nodes on one host need two roots.
cgroupRoot: /$node_name
failCgroupV1: false
failSwapOn: false
address: $node_ip
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
podLogsDir: $node_dir/pod-logs
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
maxPods: 60
serializeImagePulls: false
makeIPTablesUtilChains: false
EOF
  write_kubeconfig_for "$node_dir/kubelet.kubeconfig" node
}

start_node() {
  ensure_pause_image
  ensure_bridge
  write_node_config
  start containerd containerd --config "$node_dir/containerd.toml"
  local deadline=$((SECONDS + timeout))
  until ctr_node version >/dev/null 2>&1; do
    alive containerd || { report_dead containerd; return 1; }
    [ $SECONDS -lt $deadline ] || { log "containerd did not answer within ${timeout}s"; return 1; }
    sleep 0.1
  done
  ctr_node images import "$pause_archive" >/dev/null
  local hierarchy # the kubelet's cgroupRoot must exist in every hierarchy
  for hierarchy in /sys/fs/cgroup/*/; do
    if mountpoint -q "$hierarchy"; then mkdir -p "$hierarchy$node_name"; fi
  done
  start kubelet "$bin/kubelet" --config="$node_dir/kubelet.yaml" \
    --kubeconfig="$node_dir/kubelet.kubeconfig" --root-dir="$node_dir/kubelet" \
    --hostname-override="$node_name" --node-ip="$node_ip" \
    --register-with-taints="$real_node_taint" --node-labels="$real_node_label"
  wait_http kubelet "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz" || return 1
}

# The node Ready, with its fake GPUs in its status (again after a kubelet restart).
ensure_node_ready() {
  local deadline=$((SECONDS + timeout))
  until kc get node "$node_name" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { check_components; die "the real node did not register (see $logs/kubelet.log)"; }
    sleep 0.3
  done
  kc wait --for=condition=Ready "node/$node_name" --timeout="${timeout}s" >/dev/null ||
    { check_components; die "the real node did not turn Ready (see $logs/kubelet.log)"; }
  kc patch node "$node_name" --subresource=status --type=merge \
    -p "{\"status\":{\"capacity\":{\"nvidia.com/gpu\":\"$node_gpus\"}}}" >/dev/null
}

# Before containerd stops: kill every container of the node, so no pod
# outlives the cluster (the kubelet, already stopped, would not stop them).
stop_node_containers() {
  ctr_node version >/dev/null 2>&1 || return 0
  local id
  for id in $(ctr_node tasks ls -q 2>/dev/null); do ctr_node tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
  for id in $(ctr_node tasks ls -q 2>/dev/null); do ctr_node tasks delete -f "$id" >/dev/null 2>&1 || true; done
}

# After everything stopped: shims, mounts, pod network namespaces, the
# bridge, the node's cgroups and files. Only what this node made.
clean_node() {
  local pid mount netns
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $containerd_sock" || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # The pods' network namespaces: containerd records each in its sandbox's spec.
  for netns in $(grep -rahoE '/var/run/netns/cni-[0-9a-f-]+' "$node_data/containerd" 2>/dev/null | sort -u); do
    umount "$netns" 2>/dev/null || true
    rm -f "$netns"
  done
  # Deepest first: overlay rootfs, emptyDirs, projected tokens, shm.
  awk -v d="$node_dir/" -v e="$node_data/" 'index($5, d) == 1 || index($5, e) == 1 { print $5 }' \
    /proc/self/mountinfo | sort -r |
    while read -r mount; do umount -l "$mount" 2>/dev/null || true; done
  ip link show "$node_bridge" >/dev/null 2>&1 && ip link delete "$node_bridge"
  iptables -t nat -D PREROUTING -i "$node_bridge" -j "$nat_chain" 2>/dev/null || true
  iptables -t nat -F "$nat_chain" 2>/dev/null && iptables -t nat -X "$nat_chain" 2>/dev/null || true
  find /sys/fs/cgroup -maxdepth 2 -name "$node_name" -type d 2>/dev/null |
    while read -r mount; do find "$mount" -depth -type d -exec rmdir {} + 2>/dev/null || true; done
  find /var/log/containers -maxdepth 1 -type l -lname "$node_dir/*" -delete 2>/dev/null || true
  rm -rf "$node_dir" "$node_data"
}

node_left() { [ -d "$node_dir" ] || [ -d "$node_data" ]; } # files of a node to clean up
