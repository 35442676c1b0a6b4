"""The task API's models: a bad query or body is refused naming its field, and the
OpenAPI document's schemas are those models' (web/models.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from resonance_task.web import models
from resonance_task.web.openapi import document


@pytest.mark.parametrize(
    ("model", "given", "field"),
    [
        (models.TaskQuery, {"limit": "0"}, "limit"),
        (models.TaskQuery, {"limit": "ten"}, "limit"),
        (models.TaskQuery, {"status": "lost"}, "status"),
        (models.HourlyQuery, {"limit": "1001"}, "limit"),
        (models.BatchRequest, {"tasks": []}, "tasks"),
        (models.BatchRequest, [{"task_type": "noop"}], "body"),
        (models.ReplayRequest, {"task_ids": ["a", 7]}, "task_ids.1"),
    ],
)
def test_a_bad_request_names_its_field(model: type[BaseModel], given: Any, field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        model.model_validate(given)
    error = models.error_of(refused.value)
    assert error.field == field and error.error.startswith(f"{field}: ")


def test_queries_take_the_strings_a_url_holds() -> None:
    query = models.TaskQuery.model_validate({"status": "dead", "limit": "25"})
    assert (query.status, query.task_type, query.limit) == ("dead", None, 25)
    assert models.HourlyQuery.model_validate({}).limit == 24


def test_the_documents_schemas_are_the_models() -> None:
    schemas = document(None)["components"]["schemas"]
    for model in models.COMPONENTS:
        generated = model.model_json_schema(ref_template="#/components/schemas/{model}")
        generated.pop("$defs", None)
        assert schemas[model.__name__] == generated, model.__name__
    # The limits the views apply are the ones the document states.
    limit = schemas["TaskList"]["properties"]["count"]
    assert limit["minimum"] == 0
    params = {
        p["name"]: p["schema"]
        for p in document(None)["paths"]["/api/v1/tasks"]["get"]["parameters"]
    }
    assert params["limit"] == {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}
