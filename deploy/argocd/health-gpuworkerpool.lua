-- Argo CD health check for gpuworkers.dev/GpuWorkerPool.
-- Register it in argocd-cm as resource.customizations.health.gpuworkers.dev_GpuWorkerPool
-- (see README.md). Argo CD runs it with gopher-lua (Lua 5.1) and the object in `obj`.
--
--   Progressing  no status yet, status of an older generation, Reconciling=True,
--                or Ready not (yet) True
--   Degraded     Degraded=True (Prefect unreachable or unauthorized, API key
--                Secret missing, Deployment rejected, limit sizing problems...)
--   Healthy      Ready=True for the current generation
--
-- A pool scaled to zero (e.g. by KEDA) is Healthy once the operator confirms
-- it, not Suspended: scale-to-zero is normal operation, not a paused rollout.
local hs = {}

local function message_of(condition, fallback)
  if condition ~= nil and condition.message ~= nil and condition.message ~= "" then
    if condition.reason ~= nil and condition.reason ~= "" then
      return condition.reason .. ": " .. condition.message
    end
    return condition.message
  end
  if condition ~= nil and condition.reason ~= nil and condition.reason ~= "" then
    return condition.reason
  end
  return fallback
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = {}
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type ~= nil then
      conditions[condition.type] = condition
    end
  end
end

local degraded = conditions["Degraded"]
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = message_of(degraded, "Degraded")
  return hs
end

local ready = conditions["Ready"]
local reconciling = conditions["Reconciling"]
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = message_of(reconciling, message_of(ready, "Reconciling"))
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = message_of(ready, "Ready")
  return hs
end

hs.status = "Progressing"
hs.message = message_of(ready, "Waiting for the Ready condition")
return hs
