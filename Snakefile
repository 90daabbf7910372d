# repo2singularity: a code repository -> Docker image (repo2docker) -> SIF -> sandbox -> Jupyter.
# Each step is a rule with a file target under results/{name}/{sha}/; see README.md.


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/source.smk"
include: "workflow/rules/image.smk"
include: "workflow/rules/sif.smk"
include: "workflow/rules/sandbox.smk"
include: "workflow/rules/launch.smk"
