"""Unit tests of status and conditions (API conventions: lastTransitionTime kept unless status changes)."""

from __future__ import annotations

from diffusion_operator import status as st
from diffusion_operator.validation import FieldError


def deployment(replicas=1, ready=1, updated=1, available=None, generation=1, observed=1, spec_replicas=1):
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": spec_replicas},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "readyReplicas": ready,
            "updatedReplicas": updated,
            "availableReplicas": ready if available is None else available,
        },
    }


def conds(status):
    return {c["type"]: c for c in status["conditions"]}


def make(old, dep, desired=1, generation=3):
    return st.valid_status(old, generation, desired, dep, "a=b", "http://x.ns.svc:8000", "h1", "tag")


def test_ready_when_all_replicas_ready():
    s = make({}, deployment())
    c = conds(s)
    assert c["Ready"]["status"] == "True" and c["Ready"]["reason"] == "AllReplicasReady"
    assert c["Progressing"]["status"] == "False" and c["ConfigValid"]["status"] == "True"
    assert all(x["observedGeneration"] == 3 and x["lastTransitionTime"] for x in s["conditions"])
    assert (s["replicas"], s["readyReplicas"], s["ready"], s["observedGeneration"]) == (1, 1, "1/1", 3)
    assert s["endpoint"] == "http://x.ns.svc:8000" and s["configHash"] == "h1" and s["selector"] == "a=b"


def test_not_ready_while_rolling_or_generation_unseen():
    assert conds(make({}, deployment(ready=0)))["Ready"]["status"] == "False"
    assert conds(make({}, deployment(updated=0)))["Progressing"]["reason"] == "RollingOut"
    assert conds(make({}, deployment(generation=2, observed=1)))["Ready"]["status"] == "False"
    assert conds(make({}, deployment(), desired=2))["Ready"]["status"] == "False"
    assert conds(make({}, None))["Ready"]["reason"] == "DeploymentMissing"


def test_last_transition_time_kept_unless_status_changes():
    old = {"conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}]}
    same = conds(make(old, deployment()))
    assert same["Ready"]["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    flipped = conds(make(old, deployment(ready=0)))
    assert flipped["Ready"]["lastTransitionTime"] != "2020-01-01T00:00:00Z"


def test_recomputing_an_unchanged_status_is_equal():
    first = make({}, deployment())
    assert st.same_status(first, make(first, deployment()))


def test_invalid_status_names_the_field_and_keeps_the_rest():
    old = make({}, deployment())
    bad = st.invalid_status(old, 4, [FieldError("spec.quantize.quant_type", "needs 8.9")])
    c = conds(bad)
    assert c["ConfigValid"]["status"] == "False" and c["ConfigValid"]["reason"] == "InvalidSpec"
    assert "spec.quantize.quant_type: needs 8.9" in c["ConfigValid"]["message"]
    assert c["Ready"]["status"] == "True"  # the running pods keep serving the last valid config
    assert bad["configHash"] == "h1" and bad["observedGeneration"] == 4
    again = st.invalid_status(bad, 4, [FieldError("spec.quantize.quant_type", "needs 8.9")])
    assert st.same_status(bad, again)


def test_a_refused_child_is_synced_false_and_invalid_only_when_the_server_says_invalid():
    ok = conds(make({}, deployment()))
    assert ok["Synced"]["status"] == "True" and ok["Synced"]["reason"] == "Applied"
    invalid = st.valid_status(
        {},
        2,
        1,
        None,
        "a=b",
        "e",
        "h",
        "t",
        apply_error=("Invalid", 'Deployment x: Deployment.apps "x" is invalid'),
    )
    c = conds(invalid)
    assert (c["Synced"]["status"], c["Synced"]["reason"]) == ("False", "Invalid")
    assert c["Synced"]["message"] == 'Deployment x: Deployment.apps "x" is invalid'
    assert (c["ConfigValid"]["status"], c["ConfigValid"]["reason"]) == ("False", "RejectedByAPIServer")
    assert c["Ready"]["reason"] == "DeploymentMissing" and invalid["observedGeneration"] == 2
    forbidden = conds(
        st.valid_status({}, 2, 1, deployment(), "a=b", "e", "h", "t", apply_error=("Forbidden", "no"))
    )
    assert forbidden["Synced"]["reason"] == "Forbidden" and forbidden["ConfigValid"]["status"] == "True"
    assert forbidden["Ready"]["status"] == "True"  # the running pods are reported as they are
