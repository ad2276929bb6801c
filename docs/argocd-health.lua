-- Argo CD health check for serving.moe.dev/ModelDeployment (docs/helm.md shows where it goes:
-- argocd-cm, key resource.customizations.health.serving.moe.dev_ModelDeployment).
-- It reads only what the operator writes in .status (conditions Available / Progressing / Degraded,
-- observedGeneration, rollout state) and the pause a user asked for; it is tested with the operator's
-- real objects (tests/unit/test_chart_argocd_health.py, tests/cluster/test_helm.py).
--   Degraded     Degraded=True: an aborted rollout, failing or unschedulable pods, an invalid spec,
--                a permission the operator lacks (the condition's message says what to do)
--   Suspended    a rollout waits for a person: paused by the operator (inconclusive analysis, progress
--                deadline), by the user (kubectl moe pause, spec.rollout.paused), or at a canary step
--                `pause: {}` without a duration (kubectl moe promote continues it)
--   Healthy      Available=True and nothing in progress (Progressing=False)
--   Progressing  anything else: not yet observed, loading models, scaling, rolling out
local hs = {}

local function conditionsOf(status)
  local byType = {}
  if status.conditions ~= nil then
    for _, c in ipairs(status.conditions) do
      if c.type ~= nil then
        byType[c.type] = c
      end
    end
  end
  return byType
end

local function isTrue(c)
  return c ~= nil and c.status == "True"
end

local function userPaused(obj)
  local annotations = obj.metadata and obj.metadata.annotations
  if annotations ~= nil and annotations["serving.moe.dev/paused"] == "true" then
    return true
  end
  local rollout = obj.spec and obj.spec.rollout
  return rollout ~= nil and rollout.paused == true
end

-- The canary step the rollout is at, when it is a pause without a duration (waits for promote).
local function indefinitePauseStep(obj, status)
  local state = status.rollout
  local rollout = obj.spec and obj.spec.rollout
  if state == nil or rollout == nil or rollout.canary == nil or rollout.canary.steps == nil then
    return nil
  end
  local index = (state.stepIndex or 0) + 1         -- status counts from 0, Lua from 1
  local step = rollout.canary.steps[index]
  if step ~= nil and step.pause ~= nil and step.pause.duration == nil then
    return index
  end
  return nil
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = conditionsOf(status)
local available, progressing, degraded = conditions["Available"], conditions["Progressing"], conditions["Degraded"]

if isTrue(degraded) then
  hs.status = "Degraded"
  hs.message = degraded.message or degraded.reason or "Degraded"
  return hs
end

if isTrue(progressing) then
  if progressing.reason == "RolloutPaused" then
    hs.status = "Suspended"
    hs.message = progressing.message or "Rollout paused"
    return hs
  end
  if progressing.reason == "RollingOut" then
    if userPaused(obj) then
      hs.status = "Suspended"
      hs.message = "Rollout paused by a user (kubectl moe resume continues it): " .. (progressing.message or "")
      return hs
    end
    local step = indefinitePauseStep(obj, status)
    if step ~= nil then
      hs.status = "Suspended"
      hs.message = "Canary waits at pause step " .. tostring(step) .. " (kubectl moe promote continues it): "
        .. (progressing.message or "")
      return hs
    end
  end
  hs.status = "Progressing"
  hs.message = progressing.message or progressing.reason or "Progressing"
  return hs
end

if isTrue(available) then
  hs.status = "Healthy"
  hs.message = status.message or available.message or "Available"
  return hs
end

hs.status = "Progressing"
if available ~= nil and available.message ~= nil then
  hs.message = available.message
else
  hs.message = status.message or "Waiting for replica groups to become ready"
end
return hs
