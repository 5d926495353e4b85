"""The bootstrap's program on a cloud VM: fetch the Agent, verify it, install it, start it.

This file is sent whole inside the user-data / startup script (`render_bootstrap_script` in
clouds/base.py) and run by the image's own `python3` as root, as cloud-init runs user-data. So it
is standard library only and runs on Python >= 3.9: it cannot rely on pip, venv, a cloud CLI or
anything spotrun installs, since it is what installs them.

1. The Agent package is read from the job's store over the store's REST API, signed with the VM's
   own identity from its metadata service: IMDSv2 role credentials + SigV4 (S3), the metadata
   server's service-account token (GCS), the managed identity's token from IMDS (Azure Blob).
   The user-data holds no credential.
2. Its sha256 must equal the one the controller recorded (`spotrun_sha256` of the boot record);
   else the boot fails ("corrupt Agent package").
3. It is unpacked to /opt/spotrun/<sha16>/src (imported through PYTHONPATH: no venv needed) and
   its VM dependencies (the cloud's store SDK) are pip-installed from the image's package index
   into /opt/spotrun/<sha16>/deps (`python3 -m pip --target`; where the image has no pip but has
   venv, pip comes from a throw-away venv). A finished install is marked and reused: an image or
   disk that already holds it skips all of this.
4. The Agent runs as `python3 -m spotrun.agent`; its output goes on the console and into the
   boot log. If anything fails before the Agent starts its workload, the boot log is written to
   the store at `<job>/attempts/<n>/boot.log` (what the controller shows as the boot failure),
   and the script exits non-zero: the VM powers off.

A boot record with `role: "controller"` boots the controller host of `controller: cloud`
(spotrun/control/durable/host.py) instead: the same package, fetched and verified the same way,
runs spotrun's whole control plane, which needs Python >= 3.11. So that branch picks a Python >= 3.11
on the image (python3 itself, python3.13/3.12/3.11 on PATH, /opt/conda/bin/python, a Deep Learning
image's /opt/pytorch/bin/python), else fails the boot with "needs python >= 3.11"; pip-installs the
package's `controller-<cloud>` requirements (spotrun's own + the cloud's SDKs) for that Python into
/opt/spotrun/<sha16>-controller/deps (with its own pip, else pip's wheel fetched by the image's
python3 pip and run from the wheel, as a distribution's python3.11 may lack pip and ensurepip);
and runs `python -m spotrun.control.durable.serve --store URL`.
"""

import base64
import datetime
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request

LOG_PATH = os.environ.get("SPOTRUN_BOOT_LOG", "/var/log/spotrun-boot.log")
INSTALL_ROOT = os.environ.get("SPOTRUN_INSTALL_ROOT", "/opt/spotrun")
PIP_TIMEOUT = 900  # seconds for the whole dependency install


class BootError(Exception):
    """A failure the user should read: the message names what failed and what to check."""


def log(message):
    line = "[spotrun-boot {}] {}".format(time.strftime("%H:%M:%S"), message)
    print(line, flush=True)
    _append(line + "\n")


def _append(text):
    try:
        with open(LOG_PATH, "a") as f:
            f.write(text)
    except OSError:
        pass


def http(method, url, headers=None, body=None, timeout=30):
    """(status, headers, body) of one request; HTTP errors are answers, not exceptions."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers or {}), e.read()


# --------------------------------------------------------------------------- AWS S3


def aws_credentials(imds):
    """The instance profile's temporary credentials, from IMDSv2."""
    status, _, token = http("PUT", imds + "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    if status != 200:
        raise BootError(f"IMDSv2 refused a token (HTTP {status}) at {imds}")
    headers = {"X-aws-ec2-metadata-token": token.decode()}
    base = imds + "/latest/meta-data/iam/security-credentials/"
    status, _, roles = http("GET", base, headers)
    if status != 200 or not roles.strip():
        raise BootError(f"this instance has no instance profile (IMDS {status}): it cannot read the store")
    status, _, doc = http("GET", base + roles.decode().split()[0], headers)
    if status != 200:
        raise BootError(f"IMDS gave no credentials for the instance profile (HTTP {status})")
    creds = json.loads(doc)
    status, _, zone = http("GET", imds + "/latest/meta-data/placement/availability-zone", headers)
    creds["Region"] = zone.decode()[:-1] if status == 200 else os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    return creds


def sigv4_headers(method, url, region, creds, body, service="s3", now=None):
    """AWS Signature Version 4 for one request (headers to send)."""
    parts = urllib.parse.urlsplit(url)
    stamp = (now or datetime.datetime.utcnow()).strftime("%Y%m%dT%H%M%SZ")
    payload = hashlib.sha256(body or b"").hexdigest()
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload, "x-amz-date": stamp}
    if creds.get("Token"):
        headers["x-amz-security-token"] = creds["Token"]
    names = sorted(headers)
    query = "&".join(sorted(q for q in parts.query.split("&") if q))
    canonical = "\n".join(
        [
            method,
            parts.path or "/",
            query,
            "".join(f"{k}:{headers[k]}\n" for k in names),
            ";".join(names),
            payload,
        ]
    )
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + creds["SecretAccessKey"]).encode()
    for part in (stamp[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = "AWS4-HMAC-SHA256 Credential={}/{}, SignedHeaders={}, Signature={}".format(
        creds["AccessKeyId"],
        scope,
        ";".join(names),
        signature,
    )
    return headers


class S3:
    def __init__(self, bucket, imds):
        self.bucket, self.creds = bucket, aws_credentials(imds)
        self.region = self.creds["Region"]
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def _url(self, key):
        path = urllib.parse.quote(key, safe="/-_.~")
        if self.endpoint:
            return "{}/{}/{}".format(self.endpoint.rstrip("/"), self.bucket, path)
        return f"https://{self.bucket}.s3.{self.region}.amazonaws.com/{path}"

    def request(self, method, key, body=None):
        for _ in range(2):
            url = self._url(key)
            headers = sigv4_headers(method, url, self.region, self.creds, body)
            if body is not None:  # else urllib says x-www-form-urlencoded, and a server may parse it away
                headers["Content-Type"] = "application/octet-stream"
            status, headers, data = http(method, url, headers, body)
            moved = {k.lower(): v for k, v in headers.items()}.get("x-amz-bucket-region")
            if status in (301, 400) and moved and moved != self.region:
                self.region = moved  # the bucket lives in another region: sign for that one
                continue
            return status, data
        return status, data


# --------------------------------------------------------------------------- GCS


class GCS:
    def __init__(self, bucket, metadata):
        self.bucket = bucket
        url = metadata + "/computeMetadata/v1/instance/service-accounts/default/token"
        status, _, doc = http("GET", url, {"Metadata-Flavor": "Google"})
        if status != 200:
            raise BootError(f"the metadata server gave no service-account token (HTTP {status}): does the VM have one?")
        self.auth = {"Authorization": "Bearer " + json.loads(doc)["access_token"]}
        self.api = (os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com").rstrip("/")

    def request(self, method, key, body=None):
        name = urllib.parse.quote(key, safe="")
        if method == "GET":
            url = f"{self.api}/storage/v1/b/{self.bucket}/o/{name}?alt=media"
            status, _, data = http("GET", url, self.auth)
        else:
            url = f"{self.api}/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name={name}"
            headers = dict(self.auth, **{"Content-Type": "application/octet-stream"})
            status, _, data = http("POST", url, headers, body)
        return status, data


# --------------------------------------------------------------------------- Azure Blob


class Blob:
    VERSION = "2021-08-06"

    def __init__(self, container, account, metadata):
        self.container = container
        conn = dict(
            p.split("=", 1) for p in os.environ.get("AZURE_STORAGE_CONNECTION_STRING", "").split(";") if "=" in p
        )
        self.key = conn.get("AccountKey")  # tests only: Azurite signs with its well-known key
        self.account = account or conn.get("AccountName") or os.environ.get("AZURE_STORAGE_ACCOUNT", "")
        self.endpoint = (
            conn.get("BlobEndpoint")
            or os.environ.get("AZURE_STORAGE_ACCOUNT_URL")
            or f"https://{self.account}.blob.core.windows.net"
        ).rstrip("/")
        self.token = None
        if not self.key:
            url = (
                metadata
                + "/metadata/identity/oauth2/token?api-version=2018-02-01&resource="
                + urllib.parse.quote("https://storage.azure.com/", safe="")
            )
            status, _, doc = http("GET", url, {"Metadata": "true"})
            if status != 200:
                raise BootError(f"IMDS gave no managed-identity token (HTTP {status}): does the VM have an identity?")
            self.token = json.loads(doc)["access_token"]

    def request(self, method, key, body=None):
        url = "{}/{}/{}".format(self.endpoint, self.container, urllib.parse.quote(key, safe="/-_.~"))
        headers = {"x-ms-date": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()), "x-ms-version": self.VERSION}
        if method == "PUT":
            headers["x-ms-blob-type"] = "BlockBlob"
            headers["Content-Type"] = "application/octet-stream"
        if self.key:
            headers["Authorization"] = self._shared_key(method, url, headers, len(body or b""))
        else:
            headers["Authorization"] = "Bearer " + self.token
        status, _, data = http(method, url, headers, body)
        return status, data

    def _shared_key(self, method, url, headers, length):
        path = urllib.parse.urlsplit(url).path
        ms = "".join(f"{k}:{headers[k]}\n" for k in sorted(headers) if k.startswith("x-ms-"))
        fields = [method, "", "", str(length) if length else "", "", headers.get("Content-Type", "")]
        text = "\n".join(fields + [""] * 6) + "\n" + ms + "/" + self.account + path
        digest = hmac.new(base64.b64decode(self.key), text.encode(), hashlib.sha256).digest()
        return f"SharedKey {self.account}:{base64.b64encode(digest).decode()}"


# --------------------------------------------------------------------------- the store


def open_store(url, notice):
    """(client, key prefix) for a store URL, signed with this VM's identity."""
    parts = urllib.parse.urlsplit(url)
    prefix = parts.path.strip("/")
    metadata = (notice or {}).get("endpoint") or ""
    if parts.scheme == "s3":
        imds = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or metadata or "http://169.254.169.254"
        return S3(parts.netloc, imds.rstrip("/")), prefix
    if parts.scheme == "gs":
        return GCS(parts.netloc, (metadata or "http://metadata.google.internal").rstrip("/")), prefix
    if parts.scheme == "az":
        container, _, account = parts.netloc.partition("@")
        base = metadata.split("/metadata/")[0] if "/metadata/" in metadata else metadata
        return Blob(container, account, (base or "http://169.254.169.254").rstrip("/")), prefix
    raise BootError(f"no way to read a {parts.scheme!r} store from a VM")


def join(*parts):
    return "/".join(p.strip("/") for p in parts if p)


# --------------------------------------------------------------------------- install


def run(command, what, timeout=PIP_TIMEOUT):
    log("$ " + " ".join(command))
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BootError(f"{what} took more than {timeout}s") from None
    text = done.stdout.decode(errors="replace")
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()
        _append(text)
    if done.returncode != 0:
        raise BootError(f"{what} failed (exit {done.returncode}); its output is above")


def pip_command(home):
    """`python3 -m pip`, or a venv's pip where the image has venv but no pip."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        return [sys.executable, "-m", "pip"]
    venv = os.path.join(home, "pip-venv")
    if subprocess.run([sys.executable, "-m", "venv", venv], capture_output=True).returncode == 0:
        return [os.path.join(venv, "bin", "python"), "-m", "pip"]
    raise BootError("this image's python3 has neither pip nor venv: use an image with python3-pip (see docs/providers)")


def unpack(data, dest):
    import io

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            if member.name.startswith("/") or ".." in member.name.split("/") or not (member.isfile() or member.isdir()):
                raise BootError(f"the Agent package holds an unsafe entry {member.name!r}")
        tar.extractall(dest)


def install(boot, store, prefix):
    """The Agent's import path: (its own tree, its dependencies)."""
    sha = boot.get("spotrun_sha256") or ""
    home = os.path.join(INSTALL_ROOT, sha[:16] or "unversioned")
    src, deps, done = os.path.join(home, "src"), os.path.join(home, "deps"), os.path.join(home, ".installed")
    if sha and os.path.exists(done):
        log(f"the Agent {sha[:16]} is already installed at {home}")
        return src, deps
    fetch(boot, store, prefix, src)  # verified before anything is written (unpack makes the folders)
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(src, "vm-requirements.json")) as f:
        requirements = json.load(f).get(boot.get("extra") or "", [])
    if requirements:
        pip = pip_command(home)
        run(
            [
                *pip,
                "install",
                "--disable-pip-version-check",
                "--no-warn-script-location",
                "--no-compile",
                "--retries",
                "2",
            ]
            + ["--timeout", "20", "--target", deps, *requirements],
            "pip install of the Agent's dependencies ({})".format(" ".join(requirements)),
        )
    open(done, "w").close()
    return src, deps


def fetch(boot, store, prefix, src):
    """The Agent package from the store, its sha256 checked against the boot record, unpacked to src."""
    sha = boot.get("spotrun_sha256") or ""
    url = boot.get("spotrun_package") or ""
    if not url:
        raise BootError("the boot record names no Agent package")
    key = urllib.parse.urlsplit(url).path.strip("/")
    key = key[len(prefix) :].strip("/") if prefix and key.startswith(prefix) else key
    log(f"fetching the Agent package {url}")
    status, data = store.request("GET", join(prefix, key))
    if status != 200:
        raise BootError(
            "could not read the Agent package {}: HTTP {} {}".format(url, status, data[:300].decode(errors="replace"))
        )
    got = hashlib.sha256(data).hexdigest()
    if got != sha:
        raise BootError(
            "corrupt Agent package {}: sha256 {}, the controller recorded {}".format(url, got, sha or "none")
        )
    log(f"sha256 verified ({sha[:16]}, {len(data)} bytes)")
    unpack(data, src)


def start_agent(src, deps, boot_b64):
    """Run the Agent; its output goes on the console and into the boot log. Returns its exit code."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, deps])
    env["SPOTRUN_CHECKPOINT_PYTHONPATH"] = src  # what the workload gets: spotrun.checkpoint only
    env["SPOTRUN_BOOT_B64"] = boot_b64
    log(f"starting the Agent: {sys.executable} -m spotrun.agent")
    return run_teed([sys.executable, "-m", "spotrun.agent"], env)


def run_teed(command, env, cwd=None):
    """Run `command` until it exits, its output on the console and appended to the boot log."""
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        text = line.decode(errors="replace")
        sys.stdout.write(text)
        sys.stdout.flush()
        _append(text)
    return proc.wait()


def agent_started(store, prefix, boot):
    """Did the Agent get as far as its first heartbeat (then it is no boot failure)?"""
    key = join(prefix, boot["job_prefix"], "attempts", str(boot["attempt"]), "heartbeat")
    try:
        return store.request("GET", key)[0] == 200
    except Exception:  # noqa: BLE001 -- unknown: count it as not started, and ship the log
        return False


def ship_log(store, prefix, boot):
    """The boot log to `<job>/attempts/<n>/boot.log`, where the controller reads it."""
    try:
        with open(LOG_PATH, "rb") as f:
            data = f.read()[-200000:]
        key = join(prefix, boot["job_prefix"], "attempts", str(boot["attempt"]), "boot.log")
        status, _ = store.request("PUT", key, data)
        print(f"[spotrun-boot] boot log -> {key} (HTTP {status})", flush=True)
    except Exception as e:  # noqa: BLE001 -- the console still has it
        print(f"[spotrun-boot] could not ship the boot log: {e!r}", flush=True)


# --------------------------------------------------------------------------- the controller host

CONTROLLER_PYTHONS = ("python3.13", "python3.12", "python3.11", "/opt/conda/bin/python", "/opt/pytorch/bin/python")


def python_version(python):
    """(major, minor) of an interpreter, or None where it does not run."""
    try:
        done = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        major, minor = done.stdout.split()
        return int(major), int(minor)
    except ValueError:
        return None


def controller_python():
    """(path, (major, minor)) of a Python >= 3.11 on this image: spotrun's control plane needs one."""
    import shutil

    seen = []
    for name in (sys.executable, *CONTROLLER_PYTHONS):
        path = shutil.which(name) if "/" not in name else (name if os.path.exists(name) else None)
        if not path or path in seen:
            continue
        seen.append(path)
        version = python_version(path)
        log("found {} (python {})".format(path, "{}.{}".format(*version) if version else "that does not run"))
        if version and version >= (3, 11):
            return path, version
    raise BootError(
        "the controller host needs python >= 3.11 and this image has none (looked for python3, {}); "
        "use an image with one (a Deep Learning image has it)".format(", ".join(CONTROLLER_PYTHONS))
    )


def controller_pip(python, version, home):
    """A pip for `python`: its own, else pip's wheel (fetched by the image's python3 pip) run from the wheel."""
    if subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        return [python, "-m", "pip"]
    wheels = os.path.join(home, "pip-wheel")
    system_pip = pip_command(home)
    target = "{}.{}".format(*version)
    run(
        [*system_pip, "download", "--disable-pip-version-check", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", target, "--dest", wheels, "pip"],
        f"download of pip for {python}",
    )
    found = sorted(f for f in os.listdir(wheels) if f.startswith("pip-") and f.endswith(".whl"))
    if not found:
        raise BootError(f"no pip wheel for {python} came from the package index")
    return [python, os.path.join(wheels, found[-1], "pip")]


def install_controller(boot, store, prefix, python, version):
    """The controller host's import path: (the package's tree, its control-plane dependencies)."""
    sha = boot.get("spotrun_sha256") or ""
    home = os.path.join(INSTALL_ROOT, (sha[:16] or "unversioned") + "-controller")
    src, deps, done = os.path.join(home, "src"), os.path.join(home, "deps"), os.path.join(home, ".installed")
    if sha and os.path.exists(done):
        log(f"the controller {sha[:16]} is already installed at {home}")
        return src, deps
    fetch(boot, store, prefix, src)  # verified before anything is written (unpack makes the folders)
    os.makedirs(home, exist_ok=True)
    key = "controller-" + (boot.get("extra") or "")
    with open(os.path.join(src, "vm-requirements.json")) as f:
        requirements = json.load(f).get(key, [])
    if not requirements:
        raise BootError(f"the package lists no {key} requirements: was it built by an older spotrun?")
    pip = controller_pip(python, version, home)
    run(
        [*pip, "install", "--disable-pip-version-check", "--no-warn-script-location", "--no-compile"]
        + ["--retries", "2", "--timeout", "20", "--target", deps, *requirements],
        "pip install of the controller's dependencies ({})".format(" ".join(requirements)),
    )
    open(done, "w").close()
    return src, deps


def start_controller(python, src, deps, boot, boot_b64):
    """Run `python -m spotrun.control.durable.serve` until it stops; its output goes to the boot log."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([src, deps])
    env["SPOTRUN_BOOT_B64"] = boot_b64
    env["SPOTRUN_CONTROLLER_PYTHON"] = python  # what the host starts its job controllers with
    work = os.path.join(os.path.dirname(src), "run")
    os.makedirs(work, exist_ok=True)
    command = [python, "-m", "spotrun.control.durable.serve", "--store", boot["store_url"]]
    log("starting the controller host: " + " ".join(command))
    return run_teed(command, env, cwd=work)


def controller_main(boot, boot_b64):
    store = prefix = None
    try:
        store, prefix = open_store(boot["store_url"], boot.get("notice"))
        python, version = controller_python()
        src, deps = install_controller(boot, store, prefix, python, version)
        code = start_controller(python, src, deps, boot, boot_b64)
        log(f"the controller host stopped (exit {code})")
        if code == 0:
            return 0
        log(f"BOOT FAILED: the controller host exited with {code}; its output is above")
    except BootError as e:
        log(f"BOOT FAILED: {e}")
    except Exception as e:  # noqa: BLE001 -- anything else is a failed boot too, explained
        log(f"BOOT FAILED: {e!r}")
    if store is not None:
        ship_log(store, prefix, boot)
    return 1


def main():
    boot_b64 = os.environ["SPOTRUN_BOOT_B64"]
    boot = json.loads(base64.b64decode(boot_b64))
    if boot.get("role") == "controller":
        log("spotrun bootstrap: the controller host of {}".format(boot["store_url"]))
        signal.signal(signal.SIGTERM, lambda *_: None)
        return controller_main(boot, boot_b64)
    log(
        "spotrun bootstrap: job {} attempt {}, python {}".format(
            boot["job_id"], boot["attempt"], sys.version.split()[0]
        )
    )
    # A shutdown's SIGTERM is for the Agent (it checkpoints); this process must outlive it, or the
    # Agent's output pipe would break under it. A handler, unlike SIG_IGN, is not inherited.
    signal.signal(signal.SIGTERM, lambda *_: None)
    store = prefix = None
    try:
        if sys.version_info < (3, 9):  # noqa: UP036 -- this runs on the image's python3
            raise BootError(f"this image's python3 is {sys.version.split()[0]}; the Agent needs 3.9 or newer")
        store, prefix = open_store(boot["store_url"], boot.get("notice"))
        src, deps = install(boot, store, prefix)
        code = start_agent(src, deps, boot_b64)
        if code != 0 and not agent_started(store, prefix, boot):
            raise BootError(f"the Agent exited with {code} before its first heartbeat; its output is above")
        log(f"the Agent finished (exit {code})")  # past its start, the Agent reports for itself
        return code
    except BootError as e:
        log(f"BOOT FAILED: {e}")
    except Exception as e:  # noqa: BLE001 -- anything else is a failed boot too, explained
        log(f"BOOT FAILED: {e!r}")
    if store is not None:
        ship_log(store, prefix, boot)
    return 1


if __name__ == "__main__":
    sys.exit(main())
