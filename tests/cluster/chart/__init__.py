"""Tests of the chart, the Dockerfiles and the GitOps files (cluster ones: ``cluster``)."""
