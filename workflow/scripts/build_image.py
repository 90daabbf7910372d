"""Rule build_image: repo2docker builds the image on the configured builder; image.json records it."""

from repo2singularity import builders
from repo2singularity.image import ImageSpec
from repo2singularity.step import run_step

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs

spec = ImageSpec(
    name=snakemake.wildcards.name,
    sha=snakemake.wildcards.sha,
    tag=snakemake.params.tag,
    labels=snakemake.params.labels,
    user_name=snakemake.params.user_name,
    user_id=snakemake.params.user_id,
    subdir=snakemake.params.subdir,
    repo2docker_args=tuple(snakemake.params.extra_args),
    repository=snakemake.params.repository,
)
run_step(
    "build_image",
    lambda: builders.from_config(snakemake.params.builder, snakemake.log[0]).build_image(spec, snakemake.input.source, snakemake.output.receipt),
)
