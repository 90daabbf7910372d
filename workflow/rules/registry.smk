# The registry (`registry`, `registry_mode`): an image the registry holds for its commit is
# pulled, and its clone, image and save never run; what is built is pushed in push mode.


rule pull_sif:
    input:
        # nothing for an image the registry has (or had when it was pulled here); for any other
        # a file that is never there, so Snakemake takes build_image and build_sif instead
        get_registry_image,
    output:
        sif=f"{RESULTS}/{{name}}/{{sha}}/{{name}}.sif",
        checksum=f"{RESULTS}/{{name}}/{{sha}}/{{name}}.sif.sha256",
        receipt=f"{RESULTS}/{{name}}/{{sha}}/image.json",
        pulled=f"{RESULTS}/{{name}}/{{sha}}/{PULLED}",
    log:
        get_step_log("pull_sif"),
    benchmark:
        get_step_benchmark("pull_sif")
    localrule: True
    params:
        # an object: where the registry is and how to reach it rerun nothing, since a SIF that
        # was pulled stays what it is
        registry=REGISTRY,
    script:
        f"{SCRIPTS}/pull_sif.py"


ruleorder: pull_sif > build_image
ruleorder: pull_sif > build_sif


rule push_sif:
    input:
        sif=rules.build_sif.output.sif,
        checksum=rules.build_sif.output.checksum,
        receipt=rules.build_image.output.receipt,
    output:
        pushed=f"{RESULTS}/{{name}}/{{sha}}/{PUSHED}",
    log:
        get_step_log("push_sif"),
    benchmark:
        get_step_benchmark("push_sif")
    localrule: True
    params:
        registry=REGISTRY,
        # a plain value: a registry setting that pushes elsewhere pushes again
        reference=get_registry_reference,
    script:
        f"{SCRIPTS}/push_sif.py"
