rule build_image:
    input:
        source=rules.clone_source.output.source,
    output:
        receipt=f"{RESULTS}/{{name}}/{{sha}}/image.json",
    log:
        get_step_log("build_image"),
    benchmark:
        get_step_benchmark("build_image")
    group:
        BUILDER.step_group
    localrule: BUILDER.step_group is None
    resources:
        # how many Docker builds run at once: set with --resources docker_builds=N (profiles)
        docker_builds=1,
    params:
        tag=get_image_tag,
        labels=get_image_labels,
        subdir=lambda wildcards: get_build(wildcards).repository.subdir,
        user_name=settings.user_name,
        user_id=settings.user_id,
        extra_args=lambda wildcards: get_build(wildcards).repo2docker_args,
        # an object, not the URL (see clone_source): a builder that fetches the commit itself needs it
        repository=lambda wildcards: get_build(wildcards).repository,
        builder=BUILDER_SETTINGS,
    script:
        f"{SCRIPTS}/build_image.py"


rule save_image:
    input:
        receipt=rules.build_image.output.receipt,
    output:
        tarball=temp(f"{RESULTS}/{{name}}/{{sha}}/{BUILDER.saved_image_file}"),
    log:
        get_step_log("save_image"),
    benchmark:
        get_step_benchmark("save_image")
    group:
        BUILDER.step_group
    localrule: BUILDER.step_group is None
    params:
        builder=BUILDER_SETTINGS,
    script:
        f"{SCRIPTS}/save_image.py"


rule check_builder:
    log:
        f"{RESULTS}/logs/check_builder/{CALL_STAMP}.log",
    benchmark:
        f"{RESULTS}/benchmarks/check_builder/{CALL_STAMP}.tsv"
    localrule: True
    params:
        builder=BUILDER_SETTINGS,
    script:
        f"{SCRIPTS}/check_builder.py"
