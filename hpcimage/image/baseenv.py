"""The base environment of an Apptainer image: the files Apptainer's build writes into
every image (its makeBaseEnv: /.singularity.d/actions/*, env/01-base.sh, 95-apps.sh,
99-base.sh and the head of 90-environment.sh), in hpcimage's own words with the same
names and behaviour, so that Apptainer's starter runs an image built by hpcimage and
hpcimage runs one built by Apptainer.

The build writes them (imagebuild.layout); the runtime recognises them (an MPI job's
holder knows these scripts read no per-rank variable). Constants only: standard
library, no imports.
"""

_SOURCE_ENV = """for __script in /.singularity.d/env/*.sh; do
    if [ -f "$__script" ]; then
        . "$__script"
    fi
done
unset __script
"""
ACTIONS = {
    "exec": "#!/bin/sh\n\n" + _SOURCE_ENV + '\nexec "$@"\n',
    "run": "#!/bin/sh\n\n" + _SOURCE_ENV + """
if [ -n "${APPTAINER_APPNAME:-}" ]; then
    for __d in "/scif/apps/${APPTAINER_APPNAME}" /scif/apps/singularity; do
        if [ -x "$__d/scif/runscript" ]; then
            exec "$__d/scif/runscript" "$@"
        fi
    done
    echo "No Apptainer runscript for contained app: ${APPTAINER_APPNAME}"
    exit 1
elif [ -x /.singularity.d/runscript ]; then
    exec /.singularity.d/runscript "$@"
fi
echo "No Apptainer runscript found, executing /bin/sh"
exec /bin/sh "$@"
""",
    "shell": "#!/bin/sh\n\n" + _SOURCE_ENV + """
if [ -n "${APPTAINER_SHELL:-}" ] && [ -x "$APPTAINER_SHELL" ]; then
    exec $APPTAINER_SHELL "$@"
    echo "ERROR: Failed running shell as defined by '\\$APPTAINER_SHELL'" 1>&2
    exit 1
elif [ -x /bin/bash ]; then
    SHELL=/bin/bash
    PS1="Apptainer ${APPTAINER_NAME:-}:\\\\w> "
    export SHELL PS1
    exec /bin/bash --norc "$@"
elif [ -x /bin/sh ]; then
    SHELL=/bin/sh
    export SHELL
    exec /bin/sh "$@"
fi
echo "ERROR: /bin/sh does not exist in container" 1>&2
exit 1
""",
    "start": """#!/bin/sh

# tell the instance's PID 1 to go on (Apptainer's starter waits for it)
kill -CONT 1

""" + _SOURCE_ENV + """
if [ -x /.singularity.d/startscript ]; then
    exec /.singularity.d/startscript
fi
""",
    "test": "#!/bin/sh\n\n" + _SOURCE_ENV + """
if [ -n "${APPTAINER_APPNAME:-}" ]; then
    for __d in "/scif/apps/${APPTAINER_APPNAME}" /scif/apps/singularity; do
        if [ -x "$__d/scif/test" ]; then
            exec "$__d/scif/test" "$@"
        fi
    done
    echo "No tests for contained app: ${APPTAINER_APPNAME}"
    exit 1
elif [ -x /.singularity.d/test ]; then
    exec /.singularity.d/test "$@"
fi
echo "No test found in container, executing /bin/sh -c true"
exec /bin/sh -c true
""",
}
ENV_FILES = {
    "01-base.sh": "#!/bin/sh\n# The image's base environment (Apptainer's 01-base.sh): "
                  "nothing to set.\n",
    "95-apps.sh": """#!/bin/sh
# The active SCI-F app (APPTAINER_APPNAME): its bin and lib first, its environment.
if [ -n "${APPTAINER_APPNAME:-}" ]; then
    export APPTAINER_APPNAME
    if [ -d "/scif/apps/${APPTAINER_APPNAME}/" ]; then
        SCIF_APPS=/scif/apps
        SCIF_APPROOT="/scif/apps/${APPTAINER_APPNAME}"
        export SCIF_APPROOT SCIF_APPS
        PATH="/scif/apps/${APPTAINER_APPNAME}:/scif/apps/singularity:$PATH"
        if [ -d "$SCIF_APPROOT/bin" ]; then
            PATH="$SCIF_APPROOT/bin:$PATH"
        elif [ -d /scif/apps/singularity/bin ]; then
            PATH="/scif/apps/singularity/bin:$PATH"
        fi
        if [ -d "$SCIF_APPROOT/lib" ]; then
            LD_LIBRARY_PATH="$SCIF_APPROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            export LD_LIBRARY_PATH
        elif [ -d /scif/apps/singularity/lib ]; then
            LD_LIBRARY_PATH="/scif/apps/singularity/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            export LD_LIBRARY_PATH
        fi
        for __f in 01-base.sh 90-environment.sh; do
            if [ -f "$SCIF_APPROOT/scif/env/$__f" ]; then
                . "$SCIF_APPROOT/scif/env/$__f"
            elif [ -f "/scif/apps/singularity/scif/env/$__f" ]; then
                . "/scif/apps/singularity/scif/env/$__f"
            fi
        done
        unset __f
        export PATH
    else
        echo "Could not locate the container application: ${APPTAINER_APPNAME}"
        exit 1
    fi
fi
""",
    "99-base.sh": """#!/bin/sh
# Libraries bound in by the runtime (GPU, MPI, ...) come after the image's own.
if [ -z "${LD_LIBRARY_PATH:-}" ]; then
    LD_LIBRARY_PATH=/.singularity.d/libs
else
    LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/.singularity.d/libs"
fi
PS1="Apptainer> "
export LD_LIBRARY_PATH PS1
""",
}
ENVIRONMENT_HEAD = "#!/bin/sh\n# Custom environment shell code should follow\n\n"
