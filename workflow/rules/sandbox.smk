rule unpack_sandbox:
    input:
        sif=rules.build_sif.output.sif,
        checksum=rules.build_sif.output.checksum,
        receipt=rules.build_image.output.receipt,
    output:
        # a record, not the sandbox folder itself: Snakemake deletes a folder output before its
        # rule reruns, with the files users changed in it; the step swaps the sandbox itself and
        # moves those files to the work folder first
        unpacked=f"{RESULTS}/{{name}}/{{sha}}/sandbox.json",
    log:
        get_step_log("unpack_sandbox"),
    benchmark:
        get_step_benchmark("unpack_sandbox")
    params:
        runtime=settings.runtime,
        sandbox=f"{RESULTS}/{{name}}/{{sha}}/sandbox",
        work_folder=get_work_folder,
    script:
        f"{SCRIPTS}/unpack_sandbox.py"


rule sandbox:
    input:
        get_targets("{results}/{name}/{sha}/sandbox.json"),
