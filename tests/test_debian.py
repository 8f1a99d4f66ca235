"""A real distribution: Debian 12 built once with debootstrap (cached), as SquashFS."""
import pytest

from conftest import runtime_argv

pytestmark = pytest.mark.network


@pytest.fixture(params=["dir", "sqfs"])
def debian(request, debian_dir, debian_sqfs):
    return str(debian_dir if request.param == "dir" else debian_sqfs)


def test_glibc_programs_os_release_env_scripts(user, debian, userdir):
    r = user.run(runtime_argv("image-exec", "bash", "-c",
                              '. /etc/os-release; echo "$VERSION_CODENAME"; '
                              'ls --version | head -1; getent passwd "$(id -un)" | cut -d: -f1,3; '
                              'echo "$HPCIMAGE_DEBIAN_ENV $LC_ALL"; pwd; '
                              'ldd /bin/ls | grep -c libc.so.6'),
                 env={"HPCIMAGE_IMAGE": debian}, cwd=str(userdir))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "bookworm"
    assert lines[1].startswith("ls (GNU coreutils)")
    assert lines[2] == f"{user.name}:{user.uid}"
    assert lines[3] == "1 C.UTF-8"
    assert lines[4] == str(userdir)
    assert lines[5] == "1"


def test_debian_runscript_and_shell(user, debian):
    r = user.run(runtime_argv("image-run", "-c", "echo $BASH_VERSION"),
                 env={"HPCIMAGE_IMAGE": debian})
    assert r.returncode == 0 and r.stdout.startswith("5."), r.stderr
    r = user.run(runtime_argv("image-shell", "-c", "echo $0"), env={"HPCIMAGE_IMAGE": debian})
    assert r.stdout.strip() == "/bin/bash"
