from tests.harness import pipeline, pipeline_factory

__all__ = ["pipeline", "pipeline_factory"]
