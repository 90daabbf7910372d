rule unpack_sandbox:
    input:
        sif=rules.build_sif.output.sif,
        checksum=rules.build_sif.output.checksum,
    output:
        sandbox=directory(f"{RESULTS}/{{name}}/{{sha}}/sandbox"),
    log:
        get_step_log("unpack_sandbox"),
    benchmark:
        get_step_benchmark("unpack_sandbox")
    params:
        runtime=settings.runtime,
    script:
        f"{SCRIPTS}/unpack_sandbox.py"


rule sandbox:
    input:
        get_targets("{results}/{name}/{sha}/sandbox"),
