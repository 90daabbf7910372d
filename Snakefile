# repo2singularity turns a code repository into a Docker image (repo2docker), a SIF, a sandbox and
# a running Jupyter server. Each step is a rule with a file target under results/{name}/{sha}/.


configfile: f"{workflow.basedir}/config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/source.smk"
include: "workflow/rules/image.smk"
include: "workflow/rules/sif.smk"
include: "workflow/rules/registry.smk"
include: "workflow/rules/sandbox.smk"
include: "workflow/rules/launch.smk"
include: "workflow/rules/summary.smk"


rule all:
    default_target: True
    input:
        get_default_targets,
