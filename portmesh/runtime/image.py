"""A small image built offline: Debian's static busybox and its applet links, nothing else.

No registry is reachable from this machine, so the demo and the tests cannot
pull anything. The image is a one-layer root filesystem made here (``/bin/busybox``,
a symlink per applet, the usual empty directories, minimal ``/etc/passwd`` and
``/etc/group`` for ``httpd`` and ``id``) and imported through the Engine API
(``POST /images/create?fromSrc=-``), which Docker and Podman both serve.
Importing is idempotent: an existing tag is left alone.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import docker
import docker.errors

BUSYBOX_IMAGE = "portmesh/busybox:latest"
BUSYBOX_PATHS = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
DIRS = ("bin", "dev", "etc", "proc", "root", "sys", "tmp", "var/www", "www")
FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hostname": "portmesh\n",
}


def find_busybox() -> Path:
    """The static busybox binary (Debian ``busybox-static``); a dynamic one would need its libraries."""
    which = shutil.which("busybox")
    for path in (*BUSYBOX_PATHS, *([Path(which)] if which else [])):
        # A dynamic executable names its loader (PT_INTERP) within its first page.
        if path.is_file() and b"/ld-linux" not in path.read_bytes()[:4096]:
            return path
    raise FileNotFoundError("no static busybox found: install Debian's busybox-static")


def rootfs_tar(busybox: Path | None = None) -> bytes:
    """The image's root filesystem as an uncompressed tar (about 2 MB)."""
    binary = busybox or find_busybox()
    applets = subprocess.run([str(binary), "--list"], capture_output=True, text=True, check=True).stdout.split()
    now = int(time.time())
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in DIRS:
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755, now
            tar.addfile(info)
        tar.add(str(binary), arcname="bin/busybox", recursive=False)
        for applet in sorted(set(applets) - {"busybox"}):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, "busybox", 0o777, now
            tar.addfile(info)
        for name, text in FILES.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, now
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def has_image(client: docker.DockerClient, ref: str) -> bool:
    try:
        client.images.get(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def ensure_busybox_image(client: docker.DockerClient, ref: str = BUSYBOX_IMAGE) -> bool:
    """Import the busybox image as ``ref`` unless the engine has it; True if it was imported."""
    if has_image(client, ref):
        return False
    repository, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "latest")
    client.api.import_image_from_data(rootfs_tar(), repository=repository, tag=tag, changes=['CMD ["/bin/sh"]', "WORKDIR /"])
    if not has_image(client, ref):
        raise RuntimeError(f"the engine accepted the import but has no image {ref}")
    return True
