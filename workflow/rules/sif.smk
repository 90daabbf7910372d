rule build_sif:
    input:
        tarball=rules.save_image.output.tarball,
    output:
        sif=f"{RESULTS}/{{name}}/{{sha}}/{{name}}.sif",
        checksum=f"{RESULTS}/{{name}}/{{sha}}/{{name}}.sif.sha256",
    log:
        get_step_log("build_sif"),
    benchmark:
        get_step_benchmark("build_sif")
    group:
        BUILDER.step_group
    localrule: BUILDER.step_group is None
    params:
        # read by the builder from the configuration; here so that a change rebuilds the SIF
        runtime=settings.runtime,
        compression=settings.sif_compression,
    script:
        f"{SCRIPTS}/build_sif.py"


rule build:
    input:
        get_targets("{results}/{name}/{sha}/{name}.sif"),
        get_push_targets,
