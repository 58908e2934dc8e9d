-- Argo CD health check for slmfleet.dev/AgentTask (register it as in argocd/argocd-cm.yaml).
--
-- Reads only what the operator writes in status: observedGeneration, phase and the
-- conditions (operator/slm_operator/conditions.py). In order:
--   1. Progressing while the operator has not yet observed the current spec (no status, or
--      status.observedGeneration < metadata.generation): anything else would be stale.
--   2. Healthy when Ready=True: a model serves the task's calls within its SLO, or the task
--      scaled to zero while idle (reason ScaledToZero, serving.minReplicas 0) or starting a replica
--      again for calls that came back (WakingFromZero). A retraining
--      that runs or fails beside a served model leaves it Healthy (the old model keeps
--      serving); its state is in the message.
--   3. Degraded when the spec is invalid (InvalidSpec), a Job failed (JobFailed,
--      ResultMissing), no candidate passed the gate (GateNotMet), the API server refused
--      a child the operator applies (ApplyFailed: a quota, a webhook), a promoted model's
--      rollout made no progress (RolloutStuck: its Triton pods never got ready), or phase is
--      Failed.
--   4. Degraded while fallback to the LLM is active past its window: FallbackActive=True with
--      reason SLOBreached, NoReadyReplicas or MetricsUnavailable. The operator turns fallback
--      on only after spec.fallback.policy.breachWindows consecutive breached SLO windows, so
--      the window is already applied when the condition flips; the check needs no clock.
--      FallbackActive=True with reason Recovering (the SLO is met again, the operator waits
--      out recoveryWindows) is Progressing; with NoServingModel (nothing trained yet) the
--      pipeline's phase decides.
--   5. Progressing while data preparation, training, evaluation, export or deployment runs.
--
-- Written for Argo CD's sandbox (gopher-lua, Lua 5.1, no string or math library): only base
-- functions and table access are used.

local hs = {}

local function conditionOf(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return tostring(c.reason) .. ": " .. c.message
  end
  return fallback
end

local FAILURE_REASONS = {
  InvalidSpec = true, JobFailed = true, ResultMissing = true, GateNotMet = true, ApplyFailed = true,
  RolloutStuck = true,
}
local FALLBACK_DEGRADED = { SLOBreached = true, NoReadyReplicas = true, MetricsUnavailable = true }
local PROGRESSING_PHASES = {
  Pending = "waiting to start",
  PreparingData = "curating the logged calls",
  Training = "fine-tuning the candidates",
  Evaluating = "scoring the candidates against the LLM",
  Exporting = "building the Triton model repository",
  Deploying = "starting Triton replicas",
  Serving = "serving",
}

local status = obj.status
local generation = obj.metadata.generation
if status == nil or status.observedGeneration == nil
    or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation or 1)
  return hs
end

local ready = conditionOf(status, "Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  if status.revision ~= nil and status.revision.training ~= nil and status.revision.training ~= "" then
    hs.message = hs.message .. "; retraining revision " .. status.revision.training
  end
  return hs
end

if ready ~= nil and ready.reason == "InvalidSpec" then
  hs.status = "Degraded"
  hs.message = describe(ready, "InvalidSpec")
  return hs
end
if status.conditions ~= nil then
  for _, c in ipairs(status.conditions) do
    if c.status == "False" and FAILURE_REASONS[c.reason] then
      hs.status = "Degraded"
      hs.message = c.type .. " " .. describe(c, c.reason)
      return hs
    end
  end
end
if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = status.message or describe(ready, "phase Failed")
  return hs
end

local fallback = conditionOf(status, "FallbackActive")
if fallback ~= nil and fallback.status == "True" then
  if FALLBACK_DEGRADED[fallback.reason] then
    hs.status = "Degraded"
    hs.message = "Fallback to the LLM is active: " .. describe(fallback, fallback.reason)
    return hs
  end
  if fallback.reason == "Recovering" then
    hs.status = "Progressing"
    hs.message = "Recovering from fallback to the LLM: " .. describe(fallback, "Recovering")
    return hs
  end
end

hs.status = "Progressing"
local doing = PROGRESSING_PHASES[status.phase or "Pending"] or "working"
hs.message = (status.phase or "Pending") .. " (" .. doing .. ")"
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  hs.message = hs.message .. ": " .. ready.message
end
return hs
