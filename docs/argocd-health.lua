-- Argo CD health check for llmengine.io/LLMEngine.
--
-- Install it in the argocd-cm ConfigMap (see docs/gitops.md):
--   resource.customizations.health.llmengine.io_LLMEngine: |
--     <this file>
--
-- Healthy     the Ready condition is True and the operator has acted on the current spec
--             (status.observedGeneration == metadata.generation).
-- Degraded    phase Failed or Degraded (or the kstatus Stalled condition is True), with the operator's message.
-- Progressing everything else: no status yet, a spec the operator has not observed, Pending, Queued, Building,
--             Deploying.

local hs = {}

local function condition(status, type_)
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

-- The first non-empty argument (arguments may be nil, so no ipairs).
local function first_message(...)
  for i = 1, select("#", ...) do
    local m = select(i, ...)
    if m ~= nil and m ~= "" then
      return m
    end
  end
  return ""
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

local generation = obj.metadata.generation
local observed = status.observedGeneration
local phase = status.phase or ""
local ready = condition(status, "Ready")
local stalled = condition(status, "Stalled")

if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
  return hs
end

if phase == "Failed" or phase == "Degraded" or (stalled ~= nil and stalled.status == "True") then
  hs.status = "Degraded"
  hs.message = first_message(status.message, stalled and stalled.message, ready and ready.message, phase)
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = first_message(status.message, ready.message, "Ready")
  return hs
end

hs.status = "Progressing"
if phase ~= "" and status.message ~= nil and status.message ~= "" then
  hs.message = phase .. ": " .. status.message
else
  hs.message = first_message(status.message, ready and ready.message, phase, "Reconciling")
end
return hs
