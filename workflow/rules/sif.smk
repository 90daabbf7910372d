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
        builder=BUILDER_SETTINGS,
        # plain values, so that a change of one reruns this rule (and what follows it), not
        # build_image; save_image reruns too, since image.tar is a temp() file
        sif_options=BUILDER_SETTINGS.sif_options,
    script:
        f"{SCRIPTS}/build_sif.py"


rule build:
    input:
        get_targets("{results}/{name}/{sha}/{name}.sif"),
        get_push_targets,
