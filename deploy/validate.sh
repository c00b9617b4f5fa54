#!/usr/bin/env bash
# Validates the manifests as an operator would apply them, without a
# cluster:
#   1. `kubectl kustomize deploy/` renders them;
#   2. every built-in kind is checked against Kubernetes' own OpenAPI
#      schemas, strictly (unknown fields are errors), with the
#      kubernetes-validate tool (pip, installed into a venv when missing);
#   3. `kubectl apply --dry-run=client` accepts every object. kubectl needs
#      an API server for discovery even then; a stub on loopback answers
#      discovery for the kinds used here and 404 for everything else
#      (schema validation is step 2's job, so kubectl's is off).
# Usage: deploy/validate.sh [kubernetes version, default 1.32]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-1.32}
command -v kubectl >/dev/null || { echo "kubectl is needed (apt-get install kubectl, or kubernetes-client)" >&2; exit 1; }
venv=${TESSERA_CACHE:-/var/cache/tessera}/kubernetes-validate
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv" >/dev/null || python3 -m venv --without-pip "$venv"
  "$venv/bin/pip" install -q kubernetes-validate
fi
tmp=$(mktemp -d)
stub_pid=
cleanup() { [ -n "$stub_pid" ] && kill "$stub_pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

echo "1. kubectl kustomize deploy/"
kubectl kustomize deploy > "$tmp/all.yaml"
echo "   $(grep -c '^kind:' "$tmp/all.yaml") objects"

echo "2. schemas of Kubernetes $version (strict)"
"$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "$tmp/all.yaml"

echo "3. kubectl apply --dry-run=client"
port=$((40000 + RANDOM % 10000))
python3 - "$port" > "$tmp/stub.log" 2>&1 <<'PY' &
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

def resources(*items):
    return [{"name": n, "singularName": "", "namespaced": ns, "kind": k,
             "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
            for n, k, ns in items]

groups = {
    "apps": resources(("statefulsets", "StatefulSet", True), ("daemonsets", "DaemonSet", True),
                      ("deployments", "Deployment", True)),
    "rbac.authorization.k8s.io": resources(("clusterroles", "ClusterRole", False),
                                           ("clusterrolebindings", "ClusterRoleBinding", False),
                                           ("roles", "Role", True), ("rolebindings", "RoleBinding", True)),
    "storage.k8s.io": resources(("storageclasses", "StorageClass", False), ("csidrivers", "CSIDriver", False)),
    "snapshot.storage.k8s.io": resources(("volumesnapshotclasses", "VolumeSnapshotClass", False)),
}
core = resources(("namespaces", "Namespace", False), ("services", "Service", True),
                 ("serviceaccounts", "ServiceAccount", True))

class Stub(BaseHTTPRequestHandler):
    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/api":
            return self.reply(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        if path == "/apis":
            return self.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": g + "/v1", "version": "v1"}],
                 "preferredVersion": {"groupVersion": g + "/v1", "version": "v1"}} for g in groups]})
        if path == "/api/v1":
            return self.reply(200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": core})
        for g, rs in groups.items():
            if path == "/apis/%s/v1" % g:
                return self.reply(200, {"kind": "APIResourceList", "groupVersion": g + "/v1", "resources": rs})
        self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "reason": "NotFound", "code": 404, "message": "not found"})

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Stub).serve_forever()
PY
stub_pid=$!
cat > "$tmp/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: stub, cluster: {server: "http://127.0.0.1:$port"}}]
contexts: [{name: stub, context: {cluster: stub, user: stub}}]
users: [{name: stub, user: {}}]
current-context: stub
KC
for _ in $(seq 50); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
  sleep 0.1
done
KUBECONFIG="$tmp/kubeconfig" kubectl apply --dry-run=client --validate=false --cache-dir "$tmp/cache" -f "$tmp/all.yaml"
echo "deploy/: valid"
