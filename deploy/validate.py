"""deploy/validate.sh's checks that need a parser; run with deploy/.venv's Python.

Each subcommand prints one line per check, `PASS what` or `FAIL what: why`
(and `WORLD path` for the world files and `RESOURCE path` for the resource
files a kustomization names), which validate.sh counts:

  copy-sources DOCKERFILE CONTEXT   every COPY/ADD source (not --from) exists in CONTEXT
  kustomization DIR                 every file a kustomization.yaml names exists
  schema VERSIONS FILE...           each resource against the Kubernetes JSON
                                    schemas (kubernetes-validate, strict: unknown
                                    fields fail), VERSIONS comma-separated
  policy FILE                       the rules deploy/README.md promises of a
                                    rendered manifest (sidecar, probes, security);
                                    with $TAGWARD_ENV_NAMES (comma-separated) set,
                                    tagward's env names must be among them

It renders nothing: kustomize output comes from kustomize (or kubectl kustomize).
"""

import glob
import ipaddress
import os
import sys

import yaml


def out(ok, what, why=""):
    print(("PASS " if ok else "FAIL ") + what + ("" if ok else ": " + why), flush=True)


# ---- Dockerfile --------------------------------------------------------------


def copy_sources(dockerfile, context):
    import dockerfile as parser  # Docker's own (Go) parser

    try:
        commands = parser.parse_file(dockerfile)
    except parser.GoParseError as e:
        out(False, dockerfile, f"does not parse: {e}")
        return
    context = os.path.realpath(context)
    name = os.path.relpath(dockerfile)
    seen = 0
    for c in commands:
        if c.cmd.upper() not in ("COPY", "ADD"):
            continue
        if any(f.startswith("--from") for f in c.flags):
            continue
        if c.heredocs:
            continue
        for src in c.value[:-1]:
            seen += 1
            what = f"{name}:{c.start_line} {c.cmd} {src} exists"
            if "://" in src:
                out(False, what, "remote sources are not allowed; copy files from the repository")
                continue
            path = os.path.realpath(os.path.join(context, src))
            if path != context and not path.startswith(context + os.sep):
                out(False, what, "outside the build context")
            elif glob.has_magic(src):
                out(bool(glob.glob(path)), what, "the pattern matches nothing")
            else:
                out(os.path.exists(path), what, f"no {src} in {context}")
    if seen == 0:
        out(False, f"{name} copies from the build context", "no COPY line found")


# ---- kustomization -----------------------------------------------------------


def load_yaml_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def kustomization(directory):
    path = next(
        (os.path.join(directory, n) for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")
         if os.path.exists(os.path.join(directory, n))),
        None,
    )
    if path is None:
        out(False, directory, "no kustomization.yaml")
        return
    rel = os.path.relpath(path)
    try:
        (k,) = load_yaml_docs(path)
    except Exception as e:  # noqa: BLE001 - any parse problem is the finding
        out(False, rel, f"not one YAML document: {e}")
        return

    def exists(entry, what):
        if "://" in entry or entry.startswith("github.com/"):
            out(False, f"{rel}: {what} {entry}", "remote bases are not allowed")
            return
        target = os.path.join(directory, entry)
        out(os.path.exists(target), f"{rel}: {what} {entry} exists", f"no {os.path.relpath(target)}")
        return target

    for r in k.get("resources", []) + k.get("components", []):
        target = exists(r, "resource")
        if target and os.path.isfile(target):
            print("RESOURCE " + target, flush=True)
    for p in k.get("patches", []) + [{"path": p} for p in k.get("patchesStrategicMerge", [])]:
        if isinstance(p, dict) and "path" in p:
            exists(p["path"], "patch")
    for kind in ("configMapGenerator", "secretGenerator"):
        for g in k.get(kind, []):
            for f in g.get("files", []):
                source = f.split("=", 1)[-1]
                exists(source, f"{kind} {g.get('name')} file")
                if "world" in g.get("name", "") and source.endswith((".json", ".yaml", ".yml")):
                    print("WORLD " + os.path.join(directory, source), flush=True)
            for f in g.get("envs", []) + ([g["env"]] if "env" in g else []):
                exists(f, f"{kind} {g.get('name')} env file")


# ---- schemas -----------------------------------------------------------------


def shown(file):
    """The name a file is reported by: $SHOWN_AS (rendered output), or its path."""
    return os.environ.get("SHOWN_AS") or os.path.relpath(file)


def schema(versions, files):
    import kubernetes_validate
    from kubernetes_validate import utils

    for file in files:
        rel = shown(file)
        try:
            docs = load_yaml_docs(file)
        except Exception as e:  # noqa: BLE001
            out(False, rel, f"not YAML: {e}")
            continue
        if not docs:
            out(False, rel, "holds no resource")
            continue
        for d in docs:
            if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
                out(False, rel, "a document without kind and apiVersion")
                continue
            name = f"{d['kind']}/{(d.get('metadata') or {}).get('name', '?')}"
            for v in versions:
                what = f"{rel} {name} against Kubernetes {v} (strict)"
                try:
                    kubernetes_validate.validate(d, v, strict=True)
                    out(True, what)
                except kubernetes_validate.ValidationError as e:
                    where = ".".join(str(p) for p in e.path) or "(top level)"
                    out(False, what, f"{where}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    out(False, what, f"{e.message} (a typo in kind or apiVersion?)")
                except utils.VersionNotSupportedError as e:
                    out(False, what, e.message)


# ---- policy ------------------------------------------------------------------

LOOPBACK_DEFAULT = {"TAGWARD_LISTEN": "127.0.0.1:50051", "TAGWARD_ADMIN_LISTEN": "127.0.0.1:50052"}


def host_port(addr):
    """(host, port) of HOST:PORT; ("unix", None) for unix:///PATH."""
    if addr.startswith("unix://"):
        if not addr.startswith("unix:///"):
            raise ValueError(addr)
        return "unix", None
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(addr):
    """Loopback, or a Unix socket: unreachable from outside the pod."""
    host, port = host_port(addr)
    if port is None:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def pod_template(d):
    spec = d.get("spec") or {}
    if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return spec.get("template")
    if d["kind"] == "CronJob":
        return ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")
    if d["kind"] == "Pod":
        return d
    return None


def check_containers(where, spec, pod_sc):
    """Every container of a pod: non-root, read-only, no privileges, limits."""
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        sc = c.get("securityContext") or {}
        res = c.get("resources") or {}
        problems = []
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append("runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) in (None, 0):
            problems.append("no non-zero runAsUser")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append("allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append("readOnlyRootFilesystem is not true")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            problems.append("capabilities do not drop ALL")
        seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
        if seccomp.get("type") != "RuntimeDefault":
            problems.append("seccompProfile is not RuntimeDefault")
        for part in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(res.get(part) or {}):
                problems.append(f"no cpu and memory {part}")
        out(not problems, f"{where} container {c['name']}: securityContext and resources", "; ".join(problems))


def policy(file):
    rel = shown(file)
    docs = load_yaml_docs(file)
    services = [d for d in docs if d.get("kind") == "Service"]
    workloads = [(d, pod_template(d)) for d in docs]
    workloads = [(d, t) for d, t in workloads if t]
    if not workloads:
        out(False, rel, "no workload (Deployment, StatefulSet, ...) in it")
    for d, template in workloads:
        spec = template.get("spec") or {}
        pod_sc = spec.get("securityContext") or {}
        tagwards = [c for c in spec.get("initContainers") or [] if c.get("name") == "tagward"]
        where = f"{rel} {d['kind']}/{d['metadata']['name']}"
        # Something Tagward depends on (the fleet overlay's example etcd):
        # no sidecar to check, but the same container rules.
        annotations = (d.get("metadata") or {}).get("annotations") or {}
        if annotations.get("tagward.dev/validate") == "dependency":
            check_containers(where, spec, pod_sc)
            continue
        if [c for c in spec.get("containers") or [] if c.get("name") == "tagward"] or len(tagwards) != 1:
            out(False, f"{where}: tagward is one native sidecar",
                "expected exactly one initContainer named tagward (and no regular container of that name)")
            continue
        (tw,) = tagwards
        problems = []
        if tw.get("restartPolicy") != "Always":
            problems.append("restartPolicy is not Always (not a native sidecar)")
        env = {e["name"]: e.get("value") for e in tw.get("env") or []}
        listen = env.get("TAGWARD_LISTEN") or LOOPBACK_DEFAULT["TAGWARD_LISTEN"]
        admin = env.get("TAGWARD_ADMIN_LISTEN") or LOOPBACK_DEFAULT["TAGWARD_ADMIN_LISTEN"]
        health = env.get("TAGWARD_HEALTH_LISTEN")
        try:
            for a in (listen, admin) + ((health,) if health else ()):
                host_port(a)
        except ValueError:
            out(False, f"{where}: tagward's addresses",
                f"TAGWARD_LISTEN {listen!r}, TAGWARD_ADMIN_LISTEN {admin!r} or TAGWARD_HEALTH_LISTEN {health!r}"
                " is neither HOST:PORT nor unix:///PATH")
            continue
        # The kubelet's gRPC probes dial the pod IP: the health listener when
        # there is one (then the data plane may stay on loopback or a Unix
        # socket), else the data listener.
        probed = health or listen
        probed_as = "TAGWARD_HEALTH_LISTEN" if health else "TAGWARD_LISTEN"
        if is_loopback(probed):
            problems.append(f"{probed_as} {probed} is loopback or a Unix socket: the kubelet's probes cannot reach it")
        probe_port = host_port(probed)[1]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = (tw.get(probe) or {}).get("grpc") or {}
            if grpc.get("port") != probe_port:
                problems.append(f"{probe} is not a gRPC probe on the {'health' if health else 'data'} port {probe_port}")
        liveness = ((tw.get("livenessProbe") or {}).get("grpc") or {}).get("service")
        if liveness != "liveness":
            problems.append(f"livenessProbe checks {liveness or 'the overall status'!r}, which a failed store or an etcd "
                            "outage turns NOT_SERVING: a restart loop; probe the service 'liveness'")
        if not is_loopback(admin) and not env.get("TAGWARD_ADMIN_TLS_CERT"):
            problems.append(f"TAGWARD_ADMIN_LISTEN {admin} is beyond loopback without TLS (TAGWARD_ADMIN_TLS_CERT): "
                            "the token would cross the network in the clear")
        mounts = {m["mountPath"]: m for m in tw.get("volumeMounts") or []}
        # Fleet mode keeps the state in etcd (no data directory); the URL
        # comes from a Secret.
        fleet = any(e["name"] == "TAGWARD_STORE" for e in tw.get("env") or [])
        if fleet:
            store = next(e for e in tw.get("env") or [] if e["name"] == "TAGWARD_STORE")
            if not ((store.get("valueFrom") or {}).get("secretKeyRef")):
                problems.append("TAGWARD_STORE is not taken from a Secret (secretKeyRef)")
            if "TAGWARD_DATA_DIR" in env:
                problems.append("TAGWARD_DATA_DIR is set beside TAGWARD_STORE (fleet mode keeps no data directory)")
        required = ("TAGWARD_WORLD", "TAGWARD_ADMIN_TOKEN_FILE") if fleet else ("TAGWARD_DATA_DIR", "TAGWARD_WORLD", "TAGWARD_ADMIN_TOKEN_FILE")
        for var in required:
            value = env.get(var)
            if not value:
                problems.append(f"{var} is not set")
                continue
            under = [m for m in mounts if value == m or value.startswith(m.rstrip("/") + "/")]
            mount = mounts[max(under, key=len)] if under else None
            if mount is None:
                problems.append(f"{var} {value} is on no mounted volume")
            elif var == "TAGWARD_DATA_DIR" and mount.get("readOnly"):
                problems.append(f"{var} {value} is mounted read-only")
        # TLS files: in pairs, on mounted volumes, read-only.
        for prefix in ("TAGWARD_TLS_", "TAGWARD_ADMIN_TLS_"):
            cert, key, ca = (env.get(prefix + n) for n in ("CERT", "KEY", "CLIENT_CA"))
            if bool(cert) != bool(key):
                problems.append(f"{prefix}CERT and {prefix}KEY come together (only one is set)")
            if ca and not cert:
                problems.append(f"{prefix}CLIENT_CA is set without {prefix}CERT")
            for var, value in ((prefix + "CERT", cert), (prefix + "KEY", key), (prefix + "CLIENT_CA", ca)):
                if not value:
                    continue
                under = [m for m in mounts if value.startswith(m.rstrip("/") + "/")]
                mount = mounts[max(under, key=len)] if under else None
                if mount is None:
                    problems.append(f"{var} {value} is on no mounted volume")
                elif not mount.get("readOnly"):
                    problems.append(f"{var} {value} is on a volume mounted read-write")
                elif mount.get("subPath"):
                    problems.append(f"{var} {value} is a subPath mount, which never sees a renewed certificate")
        # The application beside the sidecar reaches it on loopback, which a
        # sidecar without an identity map trusts to name any principal: a
        # shipped manifest either serves no Tagging writes or says who may
        # write as whom.
        tagging = env.get("TAGWARD_TAGGING") or "on"
        if tagging not in ("off", "read-only") and not env.get("TAGWARD_IDENTITY_MAP"):
            problems.append(f"TAGWARD_TAGGING is {tagging!r} without TAGWARD_IDENTITY_MAP: the application could "
                            "write tags as any principal it names (set read-only/off, or map verified identities)")
        known = [n for n in os.environ.get("TAGWARD_ENV_NAMES", "").split(",") if n]
        unknown = sorted(n for n in env if known and n not in known)
        if unknown:
            problems.append(f"tagward reads no {', '.join(unknown)} (a typo? it knows {', '.join(known)})")
        literal = {e["name"] for e in tw.get("env") or [] if "value" in e}
        if "TAGWARD_ADMIN_TOKEN" in literal:
            problems.append("the admin token is a literal env value; take it from a Secret")
        admin_ports = [p for p in tw.get("ports") or [] if p.get("containerPort") == host_port(admin)[1]]
        if is_loopback(admin) and admin_ports:
            problems.append("a containerPort names the admin port, which listens on loopback")
        data_ports = [p for p in tw.get("ports") or [] if p.get("containerPort") == host_port(listen)[1]]
        if is_loopback(listen) and data_ports:
            problems.append("a containerPort names the data port, which listens on loopback")
        out(not problems, f"{where}: tagward sidecar (native, gRPC probes, volumes, TLS files, data {listen}, admin {admin})",
            "; ".join(problems))

        check_containers(where, spec, pod_sc)

        # Services selecting these pods: each port they target is one the pod
        # declares (kustomize silently drops a patched list item whose merge
        # key is misspelt, so this is where such a typo shows), and none
        # targets an admin port that listens on loopback.
        labels = (template.get("metadata") or {}).get("labels") or {}
        declared = {}
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            for p in c.get("ports") or []:
                declared[p.get("containerPort")] = p
                if "name" in p:
                    declared[p["name"]] = p
        admin_port = host_port(admin)[1]
        for s in services:
            selector = (s.get("spec") or {}).get("selector") or {}
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                continue
            for p in (s.get("spec") or {}).get("ports") or []:
                target = p.get("targetPort", p.get("port"))
                what = (f"{rel} Service/{s['metadata']['name']} port {p.get('name', p.get('port'))}"
                        f" targets a port of {d['kind']}/{d['metadata']['name']}")
                problems = []
                if target not in declared:
                    problems.append(f"the pod declares no port {target!r}")
                elif declared[target].get("containerPort") == admin_port and is_loopback(admin):
                    problems.append("the admin port, which listens on loopback")
                out(not problems, what, "; ".join(problems))


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "copy-sources":
        copy_sources(*args)
    elif cmd == "kustomization":
        kustomization(*args)
    elif cmd == "schema":
        schema(args[0].split(","), args[1:])
    elif cmd == "policy":
        policy(*args)
    else:
        sys.exit(f"validate.py: unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
